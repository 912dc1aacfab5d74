"""Model and optimizer state under the unsplit model's names, so checkpoints do not depend on the split.

A stage's sub-module names its layers as the unsplit ``nn.Sequential`` does ("2.weight"), and a split
Linear holds a slice of its rows: gathering the stages of replica 0 on rank 0 and concatenating the
slices gives ``model.state_dict()`` of the unsplit model. Loading takes each rank's keys (and rows) back
out, so a model trained at K stages loads unsplit, and resumes at any other K or T.

Optimizer state is stored per parameter *name* ({"state": {name: {...}}, "param_groups": [{..., "params":
[names]}]}) instead of torch's positions; :func:`unsplit_optimizer_state` turns it into the state dict an
optimizer over the unsplit model loads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from mpisgd.comm import block_bounds
from mpisgd.modelparallel.tensor_parallel import ColumnParallelLinear

Split = Optional[tuple[int, int, int]]  # (dimension, this split, splits) of a sliced tensor, None: whole


def split_of_keys(module: nn.Module) -> dict[str, Split]:
    """For each state_dict key of ``module``: how it is sliced (rows of a split Linear) or None."""
    splits: dict[str, Split] = {key: None for key in module.state_dict()}
    for name, child in module.named_children():
        if isinstance(child, ColumnParallelLinear):
            for field in ("weight", "bias"):
                if f"{name}.{field}" in splits:
                    splits[f"{name}.{field}"] = (0, child.group.split, child.group.splits)
    return splits


def local_model_state(module: nn.Module) -> dict[str, tuple[torch.Tensor, Split]]:
    """This rank's state: {global key: (tensor on the CPU, how it is sliced)}."""
    splits = split_of_keys(module)
    return OrderedDict((key, (value.detach().cpu().clone(), splits[key])) for key, value in module.state_dict().items())


def local_optimizer_state(module: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """This rank's optimizer state by parameter name, each tensor tagged with its slicing."""
    if optimizer is None:
        return {"state": {}, "param_groups": []}
    splits = split_of_keys(module)
    name_of = {id(p): name for name, p in module.named_parameters()}
    torch_state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[str, Any] = {}
    for index, values in torch_state["state"].items():
        p = params[index]
        name = name_of[id(p)]
        state[name] = {field: (value.detach().cpu().clone(),
                               splits[name] if torch.is_tensor(value) and value.shape == p.shape else None)
                       if torch.is_tensor(value) else (value, None) for field, value in values.items()}
    groups = []
    for group, saved in zip(optimizer.param_groups, torch_state["param_groups"]):
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": [name_of[id(p)] for p in group["params"]]})
    return {"state": state, "param_groups": groups}


def _join(pieces: list[tuple[Any, Split]]) -> Any:
    """One value from the splits' pieces: concatenated along the split dimension, or the first."""
    value, split = pieces[0]
    if split is None:
        return value
    ordered = sorted(pieces, key=lambda piece: piece[1][1])  # type: ignore[index]
    return torch.cat([piece for piece, _ in ordered], dim=split[0])


def merge_model_states(parts: Iterable[dict[str, tuple[torch.Tensor, Split]]]) -> OrderedDict:
    """The unsplit state dict from every stage's and split's local state, in layer order."""
    pieces: OrderedDict = OrderedDict()
    for part in parts:
        for key, piece in part.items():
            pieces.setdefault(key, []).append(piece)
    return OrderedDict((key, _join(found)) for key, found in pieces.items())


def merge_optimizer_states(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The optimizer state by name of the whole model from the local ones."""
    state_pieces: OrderedDict = OrderedDict()
    groups: list[dict[str, Any]] = []
    for part in parts:
        for name, values in part["state"].items():
            for field, piece in values.items():
                state_pieces.setdefault(name, OrderedDict()).setdefault(field, []).append(piece)
        for index, group in enumerate(part["param_groups"]):
            if index == len(groups):
                groups.append({**group, "params": []})
            groups[index]["params"] += [n for n in group["params"] if n not in groups[index]["params"]]
    state = {name: {field: _join(found) for field, found in fields.items()} for name, fields in state_pieces.items()}
    return {"state": state, "param_groups": groups}


def _take(value: Any, split: Split) -> Any:
    """This split's rows of an unsplit ``value``."""
    if split is None or not torch.is_tensor(value):
        return value
    dimension, index, count = split
    return torch.tensor_split(value, _bounds(value.shape[dimension], count)[1:-1], dim=dimension)[index].clone()


def _bounds(n: int, parts: int) -> list[int]:
    return block_bounds(n, parts)


def load_local_model_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Load this rank's keys (and rows) of the unsplit ``state``; missing keys are an error naming them."""
    splits = split_of_keys(module)
    missing = [key for key in splits if key not in state]
    if missing:
        raise KeyError(f"the model state lacks {', '.join(missing)}")
    module.load_state_dict(OrderedDict((key, _take(state[key], split)) for key, split in splits.items()))


def load_local_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load the by-name optimizer ``state`` (from :func:`merge_optimizer_states`) into this rank's optimizer."""
    splits = split_of_keys(module)
    name_of = {id(p): name for name, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local = optimizer.state_dict()
    torch_state = {}
    for index, p in enumerate(params):
        name = name_of[id(p)]
        if name in state["state"]:
            torch_state[index] = {field: _take(value, splits[name])
                                  if torch.is_tensor(value) and value.dim() == p.dim() and value.dim() > 0 else value
                                  for field, value in state["state"][name].items()}
    groups = []
    for index, group in enumerate(local["param_groups"]):
        saved = state["param_groups"][index] if index < len(state["param_groups"]) else {}
        groups.append({**group, **{k: v for k, v in saved.items() if k != "params"}, "params": group["params"]})
    optimizer.load_state_dict({"state": torch_state, "param_groups": groups})


def unsplit_optimizer_state(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The by-name optimizer ``state`` as the ``state_dict`` of a torch optimizer over ``model.parameters()``
    in one group (or in the saved groups, by name)."""
    names = [name for name, _ in model.named_parameters()]
    position = {name: index for index, name in enumerate(names)}
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [position[n] for n in group["params"]]} for group in state["param_groups"]]
    return {"state": {position[name]: values for name, values in state["state"].items()}, "param_groups": groups}
