"""Hostile inputs, in one process: malformed HDF5 files, config files and flags (property-based, with a
fixed seed), the number of classes checked against the data, and the environment checks made before any
collective (launcher/MPI mismatch, /dev/shm, GPUs per node).

The property: every input either loads, and then holds what training needs (checked here, not by the
loader), or is refused with mpisgd's ConfigError naming the file, key or flag; nothing else escapes. Each
property test prints how many cases it tried (``pytest -s`` or ``-rP`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from collections import Counter

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpisgd import devices, preflight
from mpisgd.cli import build_parser, configure_train
from mpisgd.comm import shm
from mpisgd.data import MAX_INFERRED_CLASSES, ShardedHDF5, compatibility_problems
from mpisgd.data.sharding import contiguous_block
from mpisgd.errors import ConfigError
from mpisgd.training.config import SETTINGS, TrainConfig, flag, train_config_from

FIXED = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
FLOAT32_MAX = float(np.finfo(np.float32).max)


def write(path, x=None, y=None, **attrs):
    with h5py.File(path, "w") as file:
        if x is not None:
            file["x"] = x
        if y is not None:
            file["y"] = y
        file.attrs.update(attrs)
    return path


GOOD_X = np.zeros((8, 3), np.float32)


# ---- the number of classes --------------------------------------------------------------------

def test_a_label_of_ten_to_the_twelve_is_refused_naming_file_label_and_row(tmp_path):
    y = np.arange(8) % 2
    y[5] = 10**12
    path = write(tmp_path / "huge.h5", GOOD_X, y)
    with pytest.raises(ConfigError) as caught:
        ShardedHDF5(path, 0, 1, batch_size=4)
    message = str(caught.value)
    assert str(path) in message and "label 1000000000000 at row 5" in message and "--num-classes" in message


def test_every_rank_refuses_a_huge_label_whatever_block_holds_it(tmp_path):
    """The number of classes is inferred from all labels, on every rank: no rank gets further than another."""
    y = np.arange(9) % 3
    y[8] = 10**12  # in the last rank's block only
    path = write(tmp_path / "late.h5", np.zeros((9, 2), np.float32), y)
    for rank in range(3):
        with pytest.raises(ConfigError, match="label 1000000000000 at row 8"):
            ShardedHDF5(path, rank, 3, batch_size=1, check_contents=False)


def test_negative_labels_and_labels_beyond_a_stated_number_are_refused(tmp_path):
    y = np.arange(8) % 2
    negative = write(tmp_path / "negative.h5", GOOD_X, np.where(np.arange(8) == 6, -3, y))
    with pytest.raises(ConfigError, match=r"label -3 at row 6 is outside"):
        ShardedHDF5(negative, 0, 1, batch_size=4)
    beyond = write(tmp_path / "beyond.h5", GOOD_X, np.where(np.arange(8) == 7, 10**12, y))
    with pytest.raises(ConfigError, match=r"label 1000000000000 at row 7 is outside \[0, 2\)"):
        ShardedHDF5(beyond, 0, 1, batch_size=4, num_classes=2)


def test_a_stated_number_of_classes_may_exceed_the_inferred_bound(tmp_path):
    many = MAX_INFERRED_CLASSES + 5
    y = np.array([0, 1, 2, many - 1] * 2)
    path = write(tmp_path / "many.h5", GOOD_X, y)
    with pytest.raises(ConfigError, match=f"label {many - 1} at row 3"):
        ShardedHDF5(path, 0, 1, batch_size=4)
    assert ShardedHDF5(path, 0, 1, batch_size=4, num_classes=many).num_classes == many


@pytest.mark.parametrize("stored, message", [
    (10**12, "attribute num_classes = 1000000000000 is more than"),
    ("ten", "attribute num_classes must be a positive int, got 'ten'"),
    (2.5, "attribute num_classes must be a positive int"),
    (0, "attribute num_classes must be a positive int, got 0"),
    (np.array([2, 3]), "attribute num_classes must be a positive int"),
])
def test_a_bad_num_classes_attribute_is_refused_naming_the_file(tmp_path, stored, message):
    path = write(tmp_path / "attr.h5", GOOD_X, np.arange(8) % 2, num_classes=stored)
    with pytest.raises(ConfigError, match=message) as caught:
        ShardedHDF5(path, 0, 1, batch_size=4)
    assert str(path) in str(caught.value)


def test_num_classes_flag_reaches_the_config():
    args = build_parser().parse_args(["train", "--num-classes", "7"])
    assert configure_train(args).num_classes == 7
    with pytest.raises(ConfigError, match="--num-classes must be positive"):
        configure_train(build_parser().parse_args(["train", "--num-classes", "0"]))


def test_validation_file_of_other_features_names_both_files(tmp_path):
    train = ShardedHDF5(write(tmp_path / "t.h5", GOOD_X, np.arange(8) % 2), 0, 1, batch_size=4)
    val = ShardedHDF5(write(tmp_path / "v.h5", np.zeros((8, 4), np.float32), np.arange(8) % 2), 0, 1,
                      batch_size=4)
    (problem,) = compatibility_problems(train, val)
    assert "t.h5" in problem and "v.h5" in problem and "(4,)" in problem and "(3,)" in problem
    assert compatibility_problems(train, train) == []


@pytest.mark.parametrize("make, message", [
    (lambda f: f.create_dataset("x", data=h5py.Empty("f4")), "no dataspace"),
    (lambda f: f.create_dataset("x", shape=(8, 2**28), dtype="f4", chunks=(1, 1024)), "values per sample"),
    (lambda f: f.create_dataset("x", data=np.zeros((8, 0), np.float32)), "no features"),
    (lambda f: f.create_dataset("x", data=np.array([b"ab"] * 24).reshape(8, 3)), "floats"),
    (lambda f: f.__setitem__("x", h5py.SoftLink("/nowhere")), "no dataset 'x'"),
    (lambda f: f.__setitem__("x", h5py.ExternalLink("/nonexistent.h5", "/x")), "x"),
])
def test_structurally_hostile_x_is_refused_before_reading_it(tmp_path, make, message):
    path = tmp_path / "hostile.h5"
    with h5py.File(path, "w") as file:
        make(file)
        file["y"] = np.arange(8) % 2
    with pytest.raises(ConfigError, match=message) as caught:
        ShardedHDF5(path, 0, 1, batch_size=4)
    assert str(path) in str(caught.value)


def test_a_fifo_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        ShardedHDF5(fifo, 0, 1, batch_size=4)


def test_float64_values_beyond_float32_are_refused(tmp_path):
    x = np.zeros((8, 3))
    x[2, 1] = 1e300  # finite in the file, infinite as the float32 training sees
    with pytest.raises(ConfigError, match="beyond float32's range .*row 2"):
        ShardedHDF5(write(tmp_path / "big.h5", x, np.arange(8) % 2), 0, 1, batch_size=4)


# ---- property: generated malformed HDF5 files ---------------------------------------------------

X_DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int64", "uint64", "bool", "complex64", "S3",
            "vlen-str", "compound"]
Y_DTYPES = ["int8", "int32", "int64", "uint8", "uint64", "float32", "bool", "S3", "compound"]
FILLS = ["normal", "nan", "inf", "huge", "zero"]
LABELS = ["valid", "negative", "huge", "max", "one-class"]
CORRUPTIONS = ["none"] * 4 + ["truncate", "flip", "random-bytes", "empty-file"]
NODES = ["dataset"] * 6 + ["missing", "group", "empty-dataspace", "scalar"]
ATTRIBUTES = st.one_of(st.none(), st.none(), st.integers(-3, 10**13), st.integers(1, 12),
                       st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4),
                       st.floats(allow_nan=True), st.booleans(),
                       st.lists(st.integers(0, 9), min_size=0, max_size=3).map(np.array))


def _typed(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "vlen-str":
        return np.array([str(v) for v in values.ravel()], dtype=h5py.string_dtype()).reshape(values.shape)
    if dtype == "compound":
        out = np.zeros(values.shape, dtype=[("a", "f4"), ("b", "i4")])
        out["a"] = values
        return out
    if dtype.startswith("S"):
        return values.astype("S3")
    if dtype == "bool":
        return values != 0
    kind = np.dtype(dtype).kind
    if kind in "iu":
        info = np.iinfo(dtype)
        with np.errstate(invalid="ignore"):  # 2**63 clipped to int64's max rounds up in float64: wraps
            return np.clip(np.nan_to_num(values), info.min, info.max).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype)


def _pick(draw, tame: bool, usual, choices):
    """``usual`` in a tame case (a well-formed file, so that loading is exercised too), else any of ``choices``."""
    return usual if tame else draw(st.sampled_from(choices))


@st.composite
def hdf5_specs(draw):
    tame = draw(st.integers(0, 2)) == 0  # a third of the cases: a good file but for the odd choice below
    n = draw(st.sampled_from([5, 8, 13] if tame else [0, 1, 2, 5, 8, 13]))
    feature_shape = draw(st.lists(st.integers(1 if tame else 0, 3), min_size=1 if tame else 0, max_size=3))
    x_dtype = draw(st.sampled_from(["float32", "float64", "uint8", "float16"] if tame else X_DTYPES))
    y_dtype = draw(st.sampled_from(["int64", "uint8", "int32"] if tame else Y_DTYPES + ["int64"] * 4))
    fill, labels = _pick(draw, tame, "normal", FILLS), _pick(draw, tame, "valid", LABELS)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, *feature_shape))
    if x.size and fill != "normal":
        spot = tuple(int(rng.integers(0, d)) for d in x.shape)
        x[spot] = {"nan": np.nan, "inf": -np.inf, "huge": 1e300, "zero": 0.0}[fill]
    y = rng.integers(0, 4, n).astype(np.float64)
    if n and labels != "valid":
        spot = int(rng.integers(0, n))
        y[spot] = {"negative": -1, "huge": 1e12, "max": 2.0**63, "one-class": 0}[labels]
        if labels == "one-class":
            y[:] = 0
    y_shape_2d = not tame and draw(st.booleans()) and draw(st.booleans())
    shorter = 0 if tame else draw(st.sampled_from([0, 0, 0, 1]))
    return {
        "x": _typed(x, x_dtype), "x_node": _pick(draw, tame, "dataset", NODES),
        "y": _typed(y.reshape(n, 1) if y_shape_2d else y[: max(0, n - shorter)], y_dtype),
        "y_node": _pick(draw, tame, "dataset", NODES),
        "attribute": draw(st.one_of(st.none(), st.integers(4, 12)) if tame else ATTRIBUTES),
        "num_classes": draw(st.one_of(st.none(), st.integers(4 if tame else 1, 6))),
        "size": (size := draw(st.integers(1, 3))), "rank": draw(st.integers(0, size - 1)),
        "batch_size": draw(st.integers(1, 5)),
        "corruption": _pick(draw, tame, "none", CORRUPTIONS), "cut": draw(st.floats(0, 1)),
        "noise": draw(st.binary(min_size=0, max_size=512)),
    }


def _write_spec(path, spec) -> None:
    with h5py.File(path, "w") as file:
        for key in ("x", "y"):
            node, data = spec[f"{key}_node"], spec[key]
            if node == "dataset":
                file[key] = data
            elif node == "group":
                file.create_group(key)
            elif node == "empty-dataspace":
                file.create_dataset(key, data=h5py.Empty("f4"))
            elif node == "scalar":
                file[key] = 3
        if spec["attribute"] is not None:
            file.attrs["num_classes"] = spec["attribute"]
    corruption, raw = spec["corruption"], path.read_bytes()
    if corruption == "truncate":
        path.write_bytes(raw[: int(len(raw) * spec["cut"])])
    elif corruption == "flip":
        data = bytearray(raw)
        for i, byte in enumerate(spec["noise"][:16]):
            data[(i * 7919 + int(spec["cut"] * len(data))) % len(data)] ^= byte | 1
        path.write_bytes(bytes(data))
    elif corruption == "random-bytes":
        path.write_bytes(spec["noise"])
    elif corruption == "empty-file":
        path.write_bytes(b"")


def _stated(value) -> int | None:
    """The oracle's reading of a num_classes attribute: a positive int (or 1-element int array), else None."""
    if isinstance(value, np.ndarray):
        if value.size != 1 or value.dtype.kind not in "iu":
            return None
        value = int(value.reshape(()))
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        return None
    return int(value)


def expected_to_load(spec) -> bool:
    """Whether an undamaged file of ``spec`` holds what training needs, decided without mpisgd's code."""
    x, y, n, size, rank = spec["x"], spec["y"], len(spec["x"]), spec["size"], spec["rank"]
    if spec["x_node"] != "dataset" or spec["y_node"] != "dataset":
        return False
    if x.dtype.kind not in "fiu" or x.ndim < 2 or np.prod(x.shape[1:]) == 0:
        return False
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != n or n == 0 or n < size:
        return False
    labels = y.astype(object)  # exact for uint64 too
    if spec["num_classes"] is not None:
        classes = spec["num_classes"]
    elif spec["attribute"] is not None:
        classes = _stated(spec["attribute"])
        if classes is None or classes > MAX_INFERRED_CLASSES:
            return False
    else:
        if min(labels) < 0 or max(labels) >= MAX_INFERRED_CLASSES:
            return False
        classes = max(labels) + 1
    start, stop = rank * n // size, (rank + 1) * n // size  # the block this rank checks
    block = labels[start:stop]
    if any(label < 0 or label >= classes for label in block):
        return False
    if x.dtype.kind == "f":
        values = x[start:stop].astype(np.float64)
        if not (np.isfinite(values) & (np.abs(values) <= FLOAT32_MAX)).all():
            return False
    return True


def test_generated_malformed_hdf5_files_load_or_are_refused_naming_the_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    outcomes: Counter = Counter()

    @settings(max_examples=400, **FIXED)
    @given(spec=hdf5_specs())
    def check(spec):
        path = folder / "case.h5"
        _write_spec(path, spec)
        try:
            data = ShardedHDF5(path, spec["rank"], spec["size"], batch_size=spec["batch_size"],
                               num_classes=spec["num_classes"])
        except ConfigError as refusal:
            assert str(path) in str(refusal) or "num_classes" in str(refusal), str(refusal)
            outcomes["refused"] += 1
            if spec["corruption"] == "none":
                assert not expected_to_load(spec), f"refused a good file: {refusal}"
            return
        with data:
            if spec["corruption"] == "none":
                assert expected_to_load(spec), "loaded a file that cannot train"
            # what the loader hands out, checked here: labels in range, finite float32, all block rows
            try:
                rows = 0
                for x, y in data.iter_evaluation():
                    assert x.dtype == np.float32 or str(x.dtype) == "torch.float32"
                    assert bool(((y >= 0) & (y < data.num_classes)).all())
                    assert bool(x.isfinite().all())
                    rows += len(y)
                block = contiguous_block(data.num_samples, spec["rank"], spec["size"])
                assert rows == block.stop - block.start
                for _ in data.iter_epoch(0):
                    pass
            except ConfigError as refusal:  # damage past the header shows when the rows are read
                assert spec["corruption"] != "none" and str(path) in str(refusal), str(refusal)
                outcomes["refused while reading"] += 1
                return
        outcomes["loaded"] += 1

    check()
    tried = sum(outcomes.values())
    print(f"malformed HDF5: {tried} cases tried: {dict(outcomes)}")
    assert tried >= 300 and outcomes["loaded"] >= 20 and outcomes["refused"] >= 100, outcomes


# ---- property: config files and flags ----------------------------------------------------------

KEYS = sorted(SETTINGS) + ["epochz", "", "Data", "max--steps"]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["sync", "downpour", "sandblaster", "mlp", "cnn", "rhd", "lars", "step", "cuda", "1,2", "auto",
                     "0", "1e3", "-1", "nan", "inf", "true"]),
    st.lists(st.integers(-3, 300), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def tame_tables(draw):
    """Settings the chosen strategy reads, at their defaults or a small value of their type: files that load."""
    strategy = draw(st.sampled_from(["sync", "downpour", "sandblaster"]))
    names = [n for n, s in SETTINGS.items() if strategy in s.used_by and n != "strategy"]
    table = {"strategy": strategy}
    for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
        default = SETTINGS[name].field.default
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            table[name] = list(default) if isinstance(default, tuple) else default
        else:  # a positive value of the setting's own type (every check admits small positives but niceness)
            table[name] = draw(st.integers(1, 9)) if isinstance(default, int) else draw(st.floats(0.01, 0.9))
    return table


def _no_flags() -> argparse.Namespace:
    return argparse.Namespace(config=None, **{name: None for name in SETTINGS})


def _names_its_cause(message: str, keys, where: str) -> bool:
    """A refusal must name the setting (as flag or key), the file, or the one cross-setting rule."""
    named = [flag(k.replace("-", "_")) for k in keys] + [repr(k.replace("-", "_")) for k in keys]
    return any(name in message for name in named) or where in message or "--strategy" in message


def test_config_files_with_random_values_load_or_name_the_bad_setting(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    outcomes: Counter = Counter()

    @settings(max_examples=400, **FIXED)
    @given(table=st.one_of(tame_tables(), st.dictionaries(st.sampled_from(KEYS).flatmap(
        lambda k: st.sampled_from([k, k.replace("_", "-")])), VALUES, max_size=5)),
        as_text=st.one_of(st.none(), st.none(), st.text(max_size=40)))
    def check(table, as_text):
        path = folder / "run.json"
        path.write_text(json.dumps(table) if as_text is None else as_text)
        args = _no_flags()
        args.config = str(path)
        try:
            cfg = train_config_from(args)
        except ConfigError as refusal:
            assert _names_its_cause(str(refusal), table, str(path)), str(refusal)
            outcomes["refused"] += 1
            return
        assert isinstance(cfg, TrainConfig)
        for key in table:  # what was set is what the config holds, in the setting's own type
            value = getattr(cfg, key.replace("-", "_"))
            default = SETTINGS[key.replace("-", "_")].field.default
            if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
                assert isinstance(value, type(default)) and not isinstance(value, bool), (key, value)
        outcomes["loaded"] += 1

    check()
    tried = sum(outcomes.values())
    print(f"config files: {tried} cases tried: {dict(outcomes)}")
    assert tried >= 300 and outcomes["loaded"] >= 20 and outcomes["refused"] >= 100, outcomes


FLAGS = [flag(name) for name in SETTINGS] + ["--no-progress", "--config", "--unknown", "-x"]
SWITCHES = {flag(name) for name, s in SETTINGS.items() if isinstance(s.field.default, bool)} | {"--no-progress"}


@st.composite
def flag_lists(draw):
    """Mostly well-formed command lines (a flag, then a value unless it is a switch) with random values;
    sometimes any tokens at all."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(st.one_of(st.sampled_from(FLAGS), VALUES.map(str)), max_size=6))
    argv = []
    for name in draw(st.lists(st.sampled_from(FLAGS[:-2]), max_size=4, unique=True)):
        argv.append(name)
        if name not in SWITCHES:
            argv.append(draw(st.one_of(VALUES.map(str), st.integers(1, 9).map(str))))
    return argv


def test_random_flags_exit_2_or_name_the_bad_flag(tmp_path_factory):
    outcomes: Counter = Counter()
    parser = build_parser()  # parse_args leaves the parser as it was: one serves every case

    @settings(max_examples=300, **FIXED)
    @given(argv=flag_lists())
    def check(argv):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = parser.parse_args(["train", *argv])
        except SystemExit as exit_:
            assert exit_.code == 2 and "error:" in stderr.getvalue(), stderr.getvalue()
            outcomes["argparse refused"] += 1
            return
        try:
            configure_train(args)
        except ConfigError as refusal:
            given = [a for a in argv if a.startswith("--")]
            assert _names_its_cause(str(refusal), [g[2:] for g in given], str(args.config)), str(refusal)
            outcomes["refused"] += 1
            return
        outcomes["loaded"] += 1

    check()
    tried = sum(outcomes.values())
    print(f"flags: {tried} cases tried: {dict(outcomes)}")
    assert tried >= 200 and min(outcomes["loaded"], outcomes["refused"], outcomes["argparse refused"]) >= 10, \
        outcomes


# ---- environment checks ------------------------------------------------------------------------

@pytest.mark.parametrize("environ, named", [
    ({"PMI_SIZE": "4"}, "PMI_SIZE=4"),
    ({"OMPI_COMM_WORLD_SIZE": "3"}, "OMPI_COMM_WORLD_SIZE=3"),
    ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}, "SLURM_STEP_NUM_TASKS=8"),
])
def test_launcher_says_several_tasks_but_mpi_one_rank_is_an_error(monkeypatch, environ, named):
    monkeypatch.delenv("MPISGD_ALLOW_SINGLETON", raising=False)
    with pytest.raises(ConfigError, match=named) as caught:
        preflight.check_launch(1, environ)
    assert "MPISGD_ALLOW_SINGLETON=1" in str(caught.value) and "--mpi=pmi2" in str(caught.value)
    assert preflight.launcher_mismatch(int(environ[next(iter(environ))]), environ) is None  # sizes agree
    monkeypatch.setenv("MPISGD_ALLOW_SINGLETON", "1")
    preflight.check_launch(1, environ)


@pytest.mark.parametrize("environ, tasks", [
    ({}, 1), ({"PMI_SIZE": " 3 "}, 3), ({"OMPI_COMM_WORLD_SIZE": "4", "PMIX_SIZE": "4"}, 4),
    ({"PMI_SIZE": "garbage"}, 1), ({"SLURM_STEP_NUM_TASKS": "5"}, 1),  # srun's own count is not an MPI launch
])
def test_launched_tasks_reads_the_mpi_launchers_variables(environ, tasks):
    # what decides whether a bad command line waits for the other ranks before exiting (cli._Parser)
    assert preflight.launched_tasks(environ) == tasks


@pytest.mark.parametrize("environ", [
    {}, {"PMI_SIZE": "1"}, {"PMI_SIZE": "1", "SLURM_STEP_NUM_TASKS": "2"}, {"PMI_SIZE": "garbage"},
])
def test_one_task_launched_as_one_rank_is_fine(monkeypatch, environ):
    monkeypatch.delenv("MPISGD_ALLOW_SINGLETON", raising=False)
    preflight.check_launch(1, environ)


def test_a_batch_script_without_srun_is_warned_about(monkeypatch, caplog):
    monkeypatch.delenv("MPISGD_ALLOW_SINGLETON", raising=False)
    with caplog.at_level("WARNING"):
        preflight.check_launch(1, {"SLURM_NTASKS": "4"})
    assert "SLURM_NTASKS=4" in caplog.text and "srun" in caplog.text


class _Statvfs:
    def __init__(self, free_bytes: int) -> None:
        self.f_frsize, self.f_bavail = 4096, free_bytes // 4096


def test_dev_shm_free_space_is_read_with_statvfs(monkeypatch):
    asked = []
    monkeypatch.setattr(shm.os, "statvfs", lambda path: asked.append(path) or _Statvfs(64 << 20))
    assert shm._free_shared_memory() == 64 << 20 and asked == ["/dev/shm"]
    monkeypatch.setattr(shm.os, "statvfs", lambda path: (_ for _ in ()).throw(FileNotFoundError(path)))
    assert shm._free_shared_memory() >= 1 << 60  # no /dev/shm: nothing to check


def test_dev_shm_too_small_says_how_much_and_how_to_fix():
    message = shm.shared_memory_shortage(3 << 30, 64 << 20, 1 << 24)
    assert "3072 MiB" in message and "64 MiB" in message
    assert "--shm-size=3g" in message and "MPISGD_SHM=0" in message and "MPISGD_SHM_AREA_BYTES" in message


def test_more_ranks_per_node_than_gpus_is_an_error_naming_the_way_out(monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"4 ranks on this node but only 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=0,1\) on .*--share-gpus"):
        devices.select_device(3, 4, want_gpu=True)
    assert devices.select_device(3, 4, want_gpu=True, share_gpus=True) == "cuda:1"
