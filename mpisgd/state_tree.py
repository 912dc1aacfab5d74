"""Nested training state (state dicts, RNG states, free metadata) <-> an HDF5 tree whose every dataset
carries its own SHA-256.

Nested dicts, lists and tuples holding arrays become HDF5 groups; tensors and numpy arrays become datasets
(bit-exact, dtype kept: bfloat16 and other dtypes numpy lacks are stored as their bits); every subtree
without arrays becomes one tagged-JSON string (int dict keys, tuples and numpy scalars survive; Python
floats round-trip exactly through repr). Kept apart from :mod:`mpisgd.checkpoint`, which owns the file:
its header, manifest, atomic write and the verification order.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

import h5py
import numpy as np
import torch

from mpisgd.errors import CheckpointError

KEYS = "__keys__"  # dataset inside a dict group: tagged-JSON list of [key, child name]
METADATA = "__metadata__"  # OrderedDict._metadata of a module state_dict (module versions)
CHECKSUM = "sha256"  # attribute of every dataset: the SHA-256 of its bytes
_BITCAST_BY_ITEMSIZE = {1: torch.uint8, 2: torch.int16}


def array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- tagged JSON for array-free subtrees ------------------------------------------------------------


def _to_json(obj: Any, where: str) -> Any:
    if isinstance(obj, np.generic):  # before float: np.float64 is a float subclass
        return {"__numpy__": obj.dtype.str, "value": obj.item()}
    if obj is None or isinstance(obj, (bool, str, int, float)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(item, f"{where}[{i}]") for i, item in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in obj):
            return {key: _to_json(value, f"{where}[{key!r}]") for key, value in obj.items()}
        return {
            "__items__": [
                [_to_json(key, where), _to_json(value, f"{where}[{key!r}]")] for key, value in obj.items()
            ]
        }
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {where}")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json(item) for item in obj]
    if isinstance(obj, dict):
        if "__tuple__" in obj and len(obj) == 1:
            return tuple(_from_json(item) for item in obj["__tuple__"])
        if "__items__" in obj and len(obj) == 1:
            return {_from_json(key): _from_json(value) for key, value in obj["__items__"]}
        if "__numpy__" in obj and len(obj) == 2:
            return np.array(obj["value"], dtype=np.dtype(obj["__numpy__"]))[()]
        return {key: _from_json(value) for key, value in obj.items()}
    return obj


def _write_json(group: h5py.Group, name: str, obj: Any, where: str) -> None:
    text = json.dumps(_to_json(obj, where))
    dataset = group.create_dataset(name, data=text, dtype=h5py.string_dtype("utf-8"))
    dataset.attrs["kind"] = "json"
    dataset.attrs[CHECKSUM] = text_digest(text)


# --- nested state <-> HDF5 --------------------------------------------------------------------------


def _contains_array(obj: Any) -> bool:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return True
    if isinstance(obj, dict):
        return any(_contains_array(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_contains_array(item) for item in obj)
    return False


def _safe_name(key: Any, used: set) -> str | None:
    reserved = (".", KEYS, METADATA)
    if isinstance(key, str) and key and "/" not in key and key not in reserved and key not in used:
        return key
    return None


def write_node(group: h5py.Group, name: str, obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu()
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise TypeError(f"checkpoint: cannot store a {tensor.layout} tensor at {where}")
        try:
            array = tensor.numpy()
        except TypeError:  # bfloat16, float8: no numpy dtype; store the bits
            array = tensor.view(_BITCAST_BY_ITEMSIZE[tensor.element_size()]).numpy()
        dataset = group.create_dataset(name, data=array)
        dataset.attrs["kind"] = "tensor"
        dataset.attrs["dtype"] = str(tensor.dtype).replace("torch.", "")
        dataset.attrs[CHECKSUM] = array_digest(array)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"checkpoint: cannot store an object array at {where}")
        dataset = group.create_dataset(name, data=obj)
        dataset.attrs["kind"] = "ndarray"
        dataset.attrs[CHECKSUM] = array_digest(obj)
    elif isinstance(obj, dict) and _contains_array(obj):
        subgroup = group.create_group(name)
        subgroup.attrs["kind"] = "odict" if isinstance(obj, OrderedDict) else "dict"
        used: set = set()
        names = []
        for index, (key, value) in enumerate(obj.items()):
            child = _safe_name(key, used) or f"#{index}"
            used.add(child)
            names.append([key, child])
            write_node(subgroup, child, value, f"{where}[{key!r}]")
        _write_json(subgroup, KEYS, names, where)
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            _write_json(subgroup, METADATA, dict(metadata), f"{where}._metadata")
    elif isinstance(obj, (list, tuple)) and _contains_array(obj):
        subgroup = group.create_group(name)
        subgroup.attrs["kind"] = "tuple" if isinstance(obj, tuple) else "list"
        subgroup.attrs["length"] = len(obj)
        for index, item in enumerate(obj):
            write_node(subgroup, str(index), item, f"{where}[{index}]")
    else:
        _write_json(group, name, obj, where)


def _verified(node: h5py.Dataset, value: Any, digest: str, manifest: dict) -> Any:
    """``value`` read from ``node``, once its checksum matches both its own and the manifest's."""
    if node.attrs.get(CHECKSUM) != digest or manifest.get(node.name) != digest:
        raise CheckpointError(f"array {node.name!r} does not match its checksum (damaged or replaced)")
    return value


def read_node(node: h5py.Group | h5py.Dataset, manifest: dict) -> Any:
    kind = node.attrs.get("kind")
    if kind == "json":
        text = node.asstr()[()]
        return _from_json(json.loads(_verified(node, text, text_digest(text), manifest)))
    if kind == "tensor":
        array = node[()]
        _verified(node, array, array_digest(array), manifest)
        dtype = getattr(torch, str(node.attrs["dtype"]))
        tensor = torch.from_numpy(np.array(array, copy=True))
        return tensor.view(dtype) if tensor.dtype != dtype else tensor
    if kind == "ndarray":
        array = node[()]
        return np.array(_verified(node, array, array_digest(array), manifest), copy=True)
    if kind in ("dict", "odict"):
        pairs = read_node(node[KEYS], manifest)
        result: dict[Any, Any] = OrderedDict() if kind == "odict" else {}
        for key, child in pairs:
            result[key] = read_node(node[child], manifest)
        if METADATA in node:
            result._metadata = OrderedDict(read_node(node[METADATA], manifest))  # type: ignore[attr-defined]
        return result
    if kind in ("list", "tuple"):
        items = [read_node(node[str(index)], manifest) for index in range(int(node.attrs["length"]))]
        return tuple(items) if kind == "tuple" else items
    raise CheckpointError(f"unknown node kind {kind!r} at {node.name}")
