"""Checkpoints: exact round trips, bitwise-identical resumed training, atomic replacement."""

import os
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from mpisgd.checkpoint import (
    capture_rng_states,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_states,
    save_checkpoint,
)
from mpisgd.data import ShardedHDF5, make_classification_h5
from mpisgd.errors import ConfigError
from mpisgd.models import build_model
from mpisgd.optim import LARS, MomentumCorrectedScheduler, make_scheduler, split_decay_groups


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{index}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


def test_nested_state_round_trips_exactly(tmp_path):
    extra = {
        "step": 12,
        "tensors": [torch.arange(6, dtype=torch.int64).reshape(2, 3), torch.tensor(1.5, dtype=torch.float64),
                    torch.randn(3).to(torch.bfloat16), torch.tensor([True, False]), torch.empty(0, 4)],
        "by_int_key": {0: torch.ones(2), 7: {"nested": np.arange(3, dtype=np.uint16)}, "s": None},
        "tuple": (1, "two", 3.0000000000000004, float("inf"), float("nan"), [1, (2, 3)]),
        "numpy_scalar": np.float32(0.1),
        "json_only": {1: "a", "b": [None, True]},
        "__dunder__": 1,
        "a/b": torch.zeros(1),
    }
    model_state = OrderedDict([("layer.weight", torch.randn(2, 2)), ("layer.bias", torch.zeros(2))])
    model_state._metadata = OrderedDict([("", {"version": 1}), ("layer", {"version": 2})])
    path = save_checkpoint(tmp_path / "c.h5", model_state=model_state, extra=extra)
    loaded = load_checkpoint(path)
    _assert_same(loaded["extra"], extra)
    _assert_same(loaded["model_state"], model_state)
    assert loaded["model_state"]._metadata == model_state._metadata
    assert loaded["optimizer_state"] is None and loaded["data_position"] is None


def test_unstorable_values_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['config'\]\['callback'\]"):
        save_checkpoint(tmp_path / "c.h5", model_state={}, extra={"config": {"callback": print}})


def _make_run(data_path, optimizer_name):
    model = build_model("mlp", (5,), 4, hidden=(16,), seed=0)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(split_decay_groups(model, 1e-3), lr=0.2, momentum=0.9, nesterov=True)
    else:
        optimizer = LARS(split_decay_groups(model, 1e-3), lr=2.0, momentum=0.9, trust_coefficient=0.01)
    data = ShardedHDF5(data_path, 0, 1, batch_size=16, seed=3)  # 103 samples: 7 batches per epoch
    scheduler = MomentumCorrectedScheduler(make_scheduler(
        optimizer, steps_per_epoch=data.num_batches, epochs=3, warmup_epochs=1, schedule="cosine",
        warmup_start_factor=0.1))
    return model, optimizer, scheduler, data


def _train(run, steps):
    model, optimizer, scheduler, data = run
    for _ in range(steps):
        x, y = next(iter(data))
        x = x * np.random.uniform(0.9, 1.1) + 0.05 * torch.randn_like(x) + random.gauss(0.0, 0.01)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()


def _seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("optimizer_name", ["sgd", "lars"])
def test_resumed_training_is_bitwise_identical(tmp_path, optimizer_name):
    data_path = make_classification_h5(tmp_path / "data.h5", 103, 5, 4, seed=1)
    steps = 10  # crosses the epoch boundary at 7 and the end of warm-up

    _seed_everything(42)
    straight = _make_run(data_path, optimizer_name)
    _train(straight, 2 * steps)

    _seed_everything(42)
    first = _make_run(data_path, optimizer_name)
    _train(first, steps)
    model, optimizer, scheduler, data = first
    save_checkpoint(
        checkpoint_path(tmp_path, steps), model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(), rng_states=capture_rng_states(),
        data_position=data.state_dict(), extra={"step": steps})
    del first, model, optimizer, scheduler, data

    _seed_everything(999)  # the resumed process starts from different RNG states
    resumed = _make_run(data_path, optimizer_name)
    model, optimizer, scheduler, data = resumed
    state = load_checkpoint(latest_checkpoint(tmp_path))
    model.load_state_dict(state["model_state"])
    optimizer.load_state_dict(state["optimizer_state"])
    scheduler.load_state_dict(state["scheduler_state"])
    data.load_state_dict(state["data_position"])
    restore_rng_states(state["rng_states"])
    assert state["extra"] == {"step": steps}
    _train(resumed, steps)

    for (name, expected), actual in zip(straight[0].state_dict().items(), model.state_dict().values()):
        assert torch.equal(expected, actual), name
    _assert_same(optimizer.state_dict(), straight[1].state_dict(), "optimizer")
    assert scheduler.state_dict() == straight[2].state_dict()
    assert data.position == straight[3].position


def _good_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-000000001.h5"
    save_checkpoint(path, model_state={"w": torch.arange(4.0)}, extra={"step": 1})
    return path


def _assert_intact(path, tmp_path):
    state = load_checkpoint(path)
    assert torch.equal(state["model_state"]["w"], torch.arange(4.0)) and state["extra"] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "temporary file left behind"


def test_failure_mid_write_keeps_the_previous_checkpoint(tmp_path):
    path = _good_checkpoint(tmp_path)
    # model_state (large) is written to the temporary file before extra fails
    with pytest.raises(TypeError):
        save_checkpoint(path, model_state={"w": torch.zeros(100_000)}, extra={"bad": object()})
    _assert_intact(path, tmp_path)


def test_interrupt_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from mpisgd import state_tree

    path = _good_checkpoint(tmp_path)
    original = state_tree.write_node
    calls = []

    def write_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. SIGINT from a job scheduler
        return original(*args, **kwargs)

    monkeypatch.setattr(state_tree, "write_node", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model_state={"a": torch.zeros(3), "b": torch.ones(3)}, extra={"step": 2})
    _assert_intact(path, tmp_path)


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = _good_checkpoint(tmp_path)

    def no_rename(src, dst):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="quota"):
        save_checkpoint(path, model_state={"w": torch.zeros(4)})
    monkeypatch.undo()
    _assert_intact(path, tmp_path)


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (9, 10, 2):
        save_checkpoint(checkpoint_path(tmp_path, step), model_state={"step": torch.tensor(step)})
    (tmp_path / ".checkpoint-000000011.h5.abc.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoint-latest.h5").write_bytes(b"not ours")
    latest = latest_checkpoint(tmp_path)
    assert latest == checkpoint_path(tmp_path, 10)
    assert load_checkpoint(latest)["model_state"]["step"].item() == 10
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert deleted == [checkpoint_path(tmp_path, 2)]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    with pytest.raises(ConfigError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_loading_something_else_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ConfigError, match="as HDF5"):
        load_checkpoint(tmp_path / "text.h5")
    data = make_classification_h5(tmp_path / "data.h5", 10, 2, 2, seed=0)
    with pytest.raises(ConfigError, match="not an mpisgd checkpoint"):
        load_checkpoint(data)


def test_rng_states_round_trip(tmp_path):
    states = capture_rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint(tmp_path / "r.h5", model_state={}, rng_states=states)
    torch.rand(10), np.random.rand(10), random.random()
    restore_rng_states(load_checkpoint(tmp_path / "r.h5")["rng_states"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


# ---- integrity: checksums, versions, kill -9 during a write ------------------------------------------

import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import h5py  # noqa: E402

from mpisgd.checkpoint import HEADER_BYTES, list_checkpoints, read_writer, stale_temporaries  # noqa: E402
from mpisgd.errors import CheckpointError  # noqa: E402
from mpisgd.faults import WriteStage  # noqa: E402

logger = logging.getLogger(__name__)
MUTATIONS = 240


def _realistic_checkpoint(path):
    model = build_model("mlp", (6,), 3, (16,), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    return save_checkpoint(path, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                           rng_states=capture_rng_states(), extra={"step": 7, "strategy": "sync"},
                           writer={"strategy": "sync", "layout": {"ranks": 2}})


def _array_extents(path):
    """(offset, length) of every contiguous dataset's bytes in the file."""
    extents = []
    with h5py.File(path, "r") as file:
        def visit(name, node):
            if isinstance(node, h5py.Dataset) and node.id.get_offset() is not None and node.nbytes:
                extents.append((name, node.id.get_offset(), node.id.get_storage_size()))
        file.visititems(visit)
    return extents


def _mutate(rng, original, target):
    """One random damage of the checkpoint ``original``, written to ``target``; returns its description."""
    data = bytearray(original.read_bytes())
    kind = rng.choice(["flip_anywhere", "flip_in_array", "flip_in_header", "truncate", "append", "swap_arrays",
                       "change_attribute", "rewrite_array"])
    if kind == "flip_anywhere":
        offset = int(rng.integers(len(data)))
        data[offset] ^= int(rng.integers(1, 256))
    elif kind == "flip_in_array":
        name, start, length = _array_extents(original)[int(rng.integers(len(_array_extents(original))))]
        for _ in range(int(rng.integers(1, 65))):
            data[start + int(rng.integers(length))] ^= int(rng.integers(1, 256))
        kind += f" {name}"
    elif kind == "flip_in_header":
        data[int(rng.integers(HEADER_BYTES))] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
        del data[int(rng.integers(len(data))):]
    elif kind == "append":
        data += bytes(rng.integers(0, 256, int(rng.integers(1, 100)), dtype=np.uint8))
    target.write_bytes(bytes(data))
    if kind in ("swap_arrays", "change_attribute", "rewrite_array"):
        shutil.copyfile(original, target)
        with h5py.File(target, "r+") as file:  # HDF5 keeps the user block, so only our checks can tell
            weights = [name for name, _, _ in _array_extents(original)
                       if name.startswith("model_state/") and file[name].attrs["kind"] == "tensor"]
            if kind == "swap_arrays":
                a, b = rng.choice(weights, 2, replace=False)
                file.move(a, "swap"), file.move(b, a), file.move("swap", b)
            elif kind == "change_attribute":
                node = file[str(rng.choice(weights))]
                node.attrs["dtype"] = "float64" if node.attrs["dtype"] != "float64" else "float32"
            else:
                node = file[str(rng.choice(weights))]
                node[...] = node[()] * 1.0001 + 1e-6
    return kind


def test_every_damage_of_a_checkpoint_is_refused_naming_the_file(tmp_path):
    """Random damage (byte flips anywhere and inside weight arrays, truncation, appended bytes, swapped
    arrays, changed attributes, rewritten values) -> CheckpointError naming the file, every time."""
    original = _realistic_checkpoint(tmp_path / "original.h5")
    assert load_checkpoint(original)["extra"]["step"] == 7  # the undamaged file loads
    rng = np.random.default_rng(20240614)
    refused, kinds = 0, {}
    for index in range(MUTATIONS):
        target = tmp_path / f"damaged-{index}.h5"
        kind = _mutate(rng, original, target).split()[0]
        kinds[kind] = kinds.get(kind, 0) + 1
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(target)
        assert str(target) in str(caught.value), caught.value
        refused += 1
        target.unlink()
    logger.warning("checkpoint damage: %d of %d mutations refused (%s)", refused, MUTATIONS,
                   ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    assert refused == MUTATIONS and len(kinds) == 8


def test_damage_inside_a_weight_array_is_named(tmp_path):
    path = _realistic_checkpoint(tmp_path / "c.h5")
    name, start, length = next(e for e in _array_extents(path) if e[0] == "model_state/1.weight")
    data = bytearray(path.read_bytes())
    for offset in range(start, start + 64):  # the report: 64 bytes flipped, still valid HDF5
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum.*model_state/1\.weight"):
        load_checkpoint(path)


def test_writer_metadata_and_other_versions(tmp_path):
    path = _realistic_checkpoint(tmp_path / "c.h5")
    writer = load_checkpoint(path)["writer"]
    assert writer["strategy"] == "sync" and writer["layout"] == {"ranks": 2} and writer["format_version"] == 2
    assert read_writer(path)["layout"] == {"ranks": 2}
    old = tmp_path / "old.h5"  # format 1: plain HDF5, no header, no checksums
    with h5py.File(old, "w") as file:
        file.attrs["format"], file.attrs["format_version"] = "mpisgd-checkpoint", 1
    with pytest.raises(CheckpointError, match=r"old\.h5.*format version 1.*older mpisgd"):
        load_checkpoint(old)
    future = tmp_path / "future.h5"
    data = bytearray(path.read_bytes())
    data[:HEADER_BYTES] = data[:HEADER_BYTES].replace(b"format 2", b"format 9")
    future.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"future\.h5.*format version 9; this mpisgd reads format 2"):
        load_checkpoint(future)


_KILLED_WRITER = """
import sys, torch
from mpisgd.checkpoint import save_checkpoint
first, second = sys.argv[1], sys.argv[2]
save_checkpoint(first, model_state={"w": torch.full((50_000,), 1.0)}, extra={"step": 1})
save_checkpoint(second, model_state={"w": torch.full((50_000,), 2.0)}, extra={"step": 2})
print("not killed")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("same_file", [False, True], ids=["next-file", "same-file"])
@pytest.mark.parametrize("stage", list(WriteStage), ids=lambda stage: stage.value)
def test_kill_9_at_any_stage_of_a_write_leaves_a_valid_checkpoint(tmp_path, stage, same_file):
    """SIGKILL at each stage of the second write: the first checkpoint still loads (or, once the rename
    happened, the second does); nothing half-written is ever loaded."""
    first = checkpoint_path(tmp_path, 1)
    second = first if same_file else checkpoint_path(tmp_path, 2)
    env = {**os.environ, "MPISGD_TEST_CHECKPOINT_FAULT": f"{stage.value}:2"}
    result = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(first), str(second)], env=env,
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == -9 and "not killed" not in result.stdout, result.stderr
    renamed = stage in (WriteStage.AFTER_RENAME, WriteStage.AFTER_DIRECTORY_FSYNC)
    newest = list_checkpoints(tmp_path)[-1]
    state = load_checkpoint(newest)
    expected_step = 2 if renamed else 1
    assert state["extra"]["step"] == expected_step
    assert torch.equal(state["model_state"]["w"], torch.full((50_000,), float(expected_step)))
    for path in list_checkpoints(tmp_path):  # an older checkpoint is intact too
        load_checkpoint(path)
    assert bool(stale_temporaries(tmp_path)) == (not renamed)  # what the next writer removes


def test_checkpoint_fault_spec_is_checked(monkeypatch):
    from mpisgd import faults
    from mpisgd.errors import SharedConfigError

    monkeypatch.setenv("MPISGD_TEST_CHECKPOINT_FAULT", "after-nothing")
    with pytest.raises(SharedConfigError, match="MPISGD_TEST_CHECKPOINT_FAULT"):
        faults.checkpoint_fault()
    monkeypatch.setenv("MPISGD_TEST_SIGNAL_AT", "3:SIGNOPE")
    with pytest.raises(SharedConfigError, match="MPISGD_TEST_SIGNAL_AT"):
        faults.signal_at_step(0)
