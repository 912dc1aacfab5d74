"""Model parallelism's MPI-free parts: schedules, partitions, the rank grid, state under global names."""

import itertools

import pytest
import torch
from torch import nn

from mpisgd.errors import ConfigError, SharedConfigError
from mpisgd.modelparallel import (
    SCHEDULES,
    ActionKind,
    GridShape,
    layer_counts,
    make_schedule,
    resolve_balance,
    unsplit_optimizer_state,
)
from mpisgd.modelparallel import state as global_state
from mpisgd.modelparallel.trainer import ModelParallelSettings


def in_flight(actions):
    """The most micro-batches whose forward ran and whose backward has not yet."""
    held = most = 0
    for action in actions:
        held += 1 if action.kind is ActionKind.FORWARD else -1
        most = max(most, held)
    return most


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("stages, micro_batches", [(1, 1), (2, 2), (2, 8), (3, 4), (4, 4), (4, 7)])
def test_every_micro_batch_runs_forward_then_backward_once(name, stages, micro_batches):
    schedule = make_schedule(name, stages, micro_batches)
    for stage in range(stages):
        actions = schedule.actions(stage)
        forwards = [a.micro_batch for a in actions if a.kind is ActionKind.FORWARD]
        backwards = [a.micro_batch for a in actions if a.kind is ActionKind.BACKWARD]
        assert forwards == list(range(micro_batches)) and sorted(backwards) == list(range(micro_batches))
        for a in actions:
            if a.kind is ActionKind.BACKWARD:
                assert actions.index(a) > actions.index(a._replace(kind=ActionKind.FORWARD))


def test_1f1b_holds_at_most_k_minus_s_micro_batches_and_gpipe_all():
    gpipe, one_f_one_b = make_schedule("gpipe", 4, 8), make_schedule("1f1b", 4, 8)
    assert [in_flight(gpipe.actions(s)) for s in range(4)] == [8, 8, 8, 8]
    assert [in_flight(one_f_one_b.actions(s)) for s in range(4)] == [4, 3, 2, 1]
    assert one_f_one_b.describe(2) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7"
    assert str(one_f_one_b.actions(3)[1]) == "B0"


def test_an_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ConfigError, match="valid schedules: gpipe, 1f1b"):
        make_schedule("interleaved", 2, 2)


def heaviest(weights, counts):
    edges = list(itertools.accumulate((0,) + tuple(counts)))
    return max(sum(weights[a:b]) for a, b in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [5, 1, 1, 1, 1, 5], [0, 0, 9, 0, 1], [3, 1, 4, 1, 5, 9, 2, 6]])
def test_the_partition_is_contiguous_and_as_light_as_brute_force(weights):
    for stages in range(1, len(weights) + 1):
        counts = layer_counts(weights, stages)
        assert len(counts) == stages and min(counts) >= 1 and sum(counts) == len(weights)
        best = min(heaviest(weights, c) for c in itertools.product(range(1, len(weights) + 1), repeat=stages)
                   if sum(c) == len(weights))
        assert heaviest(weights, counts) == best


def model():
    return nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


def test_balances():
    assert resolve_balance(model(), 5, "uniform") == (1, 1, 1, 1, 1)
    assert resolve_balance(model(), 2, "params") == (2, 3)  # the big Linear with the layers after it
    assert resolve_balance(model(), 2, [4, 1]) == (4, 1)
    counts = resolve_balance(model(), 3, "time", torch.randn(8, 4))
    assert sum(counts) == 5 and len(counts) == 3
    with pytest.raises(SharedConfigError, match="needs example_input"):
        resolve_balance(model(), 2, "time")
    with pytest.raises(SharedConfigError, match="at least one layer and 5 layers in all"):
        resolve_balance(model(), 2, [5, 0])
    with pytest.raises(SharedConfigError, match="unknown balance 'flops'"):
        resolve_balance(model(), 2, "flops")


def test_grid_coordinates_and_a_world_that_does_not_factor():
    shape = GridShape(12, stages=3, splits=2)
    assert shape.replicas == 2
    assert [tuple(shape.coordinates(r)) for r in (0, 1, 2, 5, 6, 11)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 2, 1), (1, 0, 0), (1, 2, 1)]
    assert all(shape.rank_of(shape.coordinates(r)) == r for r in range(12))
    with pytest.raises(SharedConfigError, match=r"use a multiple of 4 ranks \(4, 8, 12, 16, ...\); or at 6 ranks: "
                                                r"stages in \[1, 3\] with tensor_parallel=2"):
        GridShape(6, stages=2, splits=2)


def test_state_of_splits_merges_into_the_unsplit_names_and_splits_back():
    full = nn.Linear(6, 5)
    pieces = []
    for split in range(2):
        rows = slice(0, 3) if split == 0 else slice(3, 5)
        pieces.append({"2.weight": (full.weight.detach()[rows].clone(), (0, split, 2)),
                       "2.bias": (full.bias.detach()[rows].clone(), (0, split, 2))})
    merged = global_state.merge_model_states(reversed(pieces))
    assert list(merged) == ["2.weight", "2.bias"]
    torch.testing.assert_close(merged["2.weight"], full.weight.detach())
    assert torch.equal(global_state._take(merged["2.bias"], (0, 1, 2)), full.bias.detach()[3:])


def test_optimizer_state_by_name_loads_into_an_unsplit_optimizer():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    by_name = global_state.merge_optimizer_states([global_state.local_optimizer_state(net, optimizer)])
    assert list(by_name["state"]) == [name for name, _ in net.named_parameters()]
    again = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    again.load_state_dict(unsplit_optimizer_state(by_name, net))
    assert again.param_groups[0]["lr"] == 0.1
    for a, b in zip(again.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_settings_from_a_config_and_their_checks():
    class Config:
        stages, micro_batches, balance = 2, 4, "1,3"

    settings = ModelParallelSettings.from_config(Config())
    assert (settings.stages, settings.micro_batches, settings.balance, settings.pipeline_schedule) == (2, 4, (1, 3),
                                                                                                      "gpipe")
    with pytest.raises(ConfigError, match="unknown pipeline schedule"):
        ModelParallelSettings(pipeline_schedule="zb")
    with pytest.raises(ConfigError, match="stages must be a positive integer"):
        ModelParallelSettings(stages=0)


class _Splits:
    """What ColumnParallelLinear reads of its split group at construction (no MPI)."""

    def __init__(self, split, splits):
        self.split, self.splits = split, splits


def _stage(model, layers, split=0, splits=1):
    from collections import OrderedDict

    from mpisgd.modelparallel.tensor_parallel import split_linears
    children = list(model.named_children())
    module = nn.Sequential(OrderedDict(children[i] for i in layers))
    if splits > 1:
        split_linears(module, _Splits(split, splits))
    return module


@pytest.mark.parametrize("layers, splits", [(range(0, 2), 1), (range(2, 5), 1), (range(0, 5), 3), (range(1, 4), 2)])
def test_a_partitions_pieces_are_its_parameters_in_the_unsplit_flat_vector(layers, splits):
    from mpisgd.modelparallel.slices import gather_pieces, partition_pieces
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3))
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    pushed = torch.zeros(len(flat), dtype=torch.int64)
    for split in range(splits):
        module = _stage(model, layers, split, splits)
        pieces = partition_pieces(model, module, split)
        expected = torch.nn.utils.parameters_to_vector(module.parameters()).detach().numpy()  # torch's own order
        assert (gather_pieces(flat, pieces) == expected).all()
        for piece in pieces:
            if piece.pushed:
                pushed[piece.start:piece.start + piece.length] += 1
    stage = _stage(model, layers)
    offsets = [p.numel() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    held = {n for n, _ in stage.named_parameters()}
    start = 0
    for name, n in zip(names, offsets):  # every element of the stage pushed by exactly one split, none other
        assert (pushed[start:start + n] == (1 if name in held else 0)).all(), name
        start += n
