"""The one module that knows array backends: numpy, torch (CPU and CUDA) and cupy.

Everything that communicates asks this module for a *work buffer*: a flat, contiguous array that
MPI can read and write, plus the small set of operations the all-reduce algorithms need on it
(allocate, reduce in place, scale). The decisions that would otherwise be repeated at every call
site live here once:

* dtype -> MPI datatype, and which dtype the reduction runs in (float16 and bfloat16 are
  accumulated in float32: summing many half-precision values in half precision loses digits, and
  MPI has no standard half type);
* non-contiguous or half-precision input -> a contiguous copy that is written back afterwards;
* GPU input -> synchronize the producing stream (mpi4py cannot), then either hand the device
  buffer to CUDA-aware MPI or stage it through host memory when MPI is not CUDA-aware (whether it
  is, :mod:`mpisgd.devices` decides);
* copies between arrays and the flat buffers of fused buckets (:mod:`mpisgd.comm.fusion` groups
  and cuts them).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from mpisgd.errors import ConfigError

try:  # torch is a dependency, but keep `mpisgd info` usable if it is broken
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]

TORCH_TENSOR: Any = torch.Tensor if torch is not None else ()  # for isinstance: no tensor without torch

try:
    import cupy
except ImportError:
    cupy = None

#: dtypes that travel through MPI as they are; everything else is refused with a clear error.
NATIVE_DTYPES = ("float32", "float64", "int32", "int64")
#: dtypes that are reduced in float32 and cast back.
HALF_DTYPES = ("float16", "bfloat16")
SUPPORTED_DTYPES = NATIVE_DTYPES + HALF_DTYPES

_REDUCE_UFUNC = {"sum": "add", "mean": "add", "max": "maximum", "min": "minimum"}
MPI_OPS = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
#: predefined MPI datatypes of the dtypes that reach MPI (reductions reject derived types)
MPI_DATATYPES = {"float32": MPI.FLOAT, "float64": MPI.DOUBLE, "int32": MPI.INT32_T, "int64": MPI.INT64_T}


_DTYPE_NAMES: dict = {}


def dtype_name(x: Any) -> str:
    """The dtype of an array or tensor as a plain string ('float32', 'bfloat16', ...). Cached:
    numpy's ``dtype.name`` costs microseconds, which every small all-reduce would pay."""
    dt = x.dtype
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        if torch is not None and isinstance(dt, torch.dtype):
            name = str(dt).replace("torch.", "")
        else:
            name = np.dtype(dt).name
        _DTYPE_NAMES[dt] = name
    return name


def array_kind(x: Any) -> str:
    """'numpy', 'torch' or 'cupy'; anything else is a ConfigError naming the type."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    raise ConfigError(f"expected a numpy array, torch tensor or cupy array, got {type(x).__name__}")


def is_device_array(x: Any) -> bool:
    """True for arrays living in GPU memory."""
    kind = array_kind(x)
    return kind == "cupy" or (kind == "torch" and x.is_cuda)


def describe(x: Any) -> str:
    """Short human description used in error messages: 'torch float32[3, 4] on cuda:0'."""
    kind = array_kind(x)
    where = f" on {x.device}" if kind == "torch" else (" on GPU" if kind == "cupy" else "")
    return f"{kind} {dtype_name(x)}{list(x.shape)}{where}"


def check_dtype(x: Any) -> str:
    """The dtype name of a supported array; a ConfigError for anything else."""
    array_kind(x)
    name = dtype_name(x)
    if name not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype {name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return name


def available_backends() -> dict:
    """Array libraries importable here, with versions and GPU availability."""
    found = {"numpy": np.__version__}
    if torch is not None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        found["torch"] = f"{torch.__version__} (CUDA devices: {gpus})"
    else:
        found["torch"] = "not installed"
    if cupy is not None:
        try:
            found["cupy"] = f"{cupy.__version__} (CUDA devices: {cupy.cuda.runtime.getDeviceCount()})"
        except Exception as exc:  # cupy installed without a usable driver
            found["cupy"] = f"{cupy.__version__} (no usable GPU: {exc})"
    else:
        found["cupy"] = "not installed"
    return found


def gpu_count() -> int:
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.device_count()
    if cupy is not None:
        try:
            return cupy.cuda.runtime.getDeviceCount()
        except Exception:
            return 0
    return 0


# --------------------------------------------------------------------------------------------
# Operations the algorithms need on a work buffer
# --------------------------------------------------------------------------------------------

class HostOps:
    """numpy work buffers in host memory."""

    kind = "numpy"
    device = "cpu"

    def empty(self, n: int, dtype: str):
        return np.empty(n, dtype=dtype)

    def reduce_(self, dst, src, op: str) -> None:
        getattr(np, _REDUCE_UFUNC[op])(dst, src, out=dst)

    def divide_(self, buf, divisor: int) -> None:
        np.divide(buf, divisor, out=buf)

    def buffer(self, arr):
        return [arr, MPI_DATATYPES[dtype_name(arr)]]

    def key(self, dtype: str):
        return ("numpy", dtype)


class TorchDeviceOps:
    """torch CUDA tensors handed to CUDA-aware MPI through __cuda_array_interface__/DLPack."""

    kind = "torch"

    def __init__(self, device):
        self.device = device

    def empty(self, n: int, dtype: str):
        return torch.empty(n, dtype=getattr(torch, dtype), device=self.device)

    def reduce_(self, dst, src, op: str) -> None:
        reduce: Any = {"sum": torch.add, "mean": torch.add, "max": torch.maximum, "min": torch.minimum}[op]
        reduce(dst, src, out=dst)
        torch.cuda.current_stream(self.device).synchronize()

    def divide_(self, buf, divisor: int) -> None:
        buf.div_(divisor)
        torch.cuda.current_stream(self.device).synchronize()

    def buffer(self, arr):
        return [arr, MPI_DATATYPES[dtype_name(arr)]]

    def key(self, dtype: str):
        return ("torch", str(self.device), dtype)


class CupyOps:
    """cupy arrays handed to CUDA-aware MPI."""

    kind = "cupy"
    device = "cuda"

    def empty(self, n: int, dtype: str):
        return cupy.empty(n, dtype=dtype)

    def reduce_(self, dst, src, op: str) -> None:
        getattr(cupy, _REDUCE_UFUNC[op])(dst, src, out=dst)
        cupy.cuda.get_current_stream().synchronize()

    def divide_(self, buf, divisor: int) -> None:
        cupy.divide(buf, divisor, out=buf)
        cupy.cuda.get_current_stream().synchronize()

    def buffer(self, arr):
        return [arr, MPI_DATATYPES[dtype_name(arr)]]

    def key(self, dtype: str):
        return ("cupy", cupy.cuda.runtime.getDevice(), dtype)


HOST_OPS = HostOps()


def synchronize(x: Any) -> None:
    """Wait for the stream that produced a GPU array: MPI reads memory, not stream order."""
    if array_kind(x) == "cupy":
        cupy.cuda.get_current_stream().synchronize()
    elif array_kind(x) == "torch" and x.is_cuda:
        torch.cuda.current_stream(x.device).synchronize()


@dataclass
class WorkBuffer:
    """A flat contiguous buffer MPI works on, and how to put its result back into the user's array.

    ``write_back`` is None when ``flat`` *is* the user's memory (the zero-copy common case).
    """

    flat: Any
    ops: Any
    write_back: Optional[Callable[[], None]]

    def finish(self) -> None:
        if self.write_back is not None:
            self.write_back()


def _numpy_work(x: np.ndarray) -> WorkBuffer:
    name = dtype_name(x)
    if name in HALF_DTYPES:
        flat = x.astype(np.float32).reshape(-1)
        return WorkBuffer(flat, HOST_OPS, lambda: np.copyto(x, flat.reshape(x.shape), casting="unsafe"))
    if x.flags.c_contiguous:
        return WorkBuffer(x.reshape(-1), HOST_OPS, None)
    flat = np.ascontiguousarray(x).reshape(-1)
    return WorkBuffer(flat, HOST_OPS, lambda: np.copyto(x, flat.reshape(x.shape)))


def _torch_host_work(t) -> WorkBuffer:
    """CPU tensors are viewed as numpy (zero-copy) or copied when half precision / non-contiguous."""
    name = dtype_name(t)
    if name in HALF_DTYPES:
        flat = t.detach().to(torch.float32).reshape(-1).numpy()
    elif t.is_contiguous():  # (numpy's reshape of the view is 1 us cheaper than torch's, per call)
        return WorkBuffer((t.detach() if t.requires_grad else t).numpy().reshape(-1), HOST_OPS, None)
    else:
        flat = t.detach().contiguous().reshape(-1).numpy()

    def write_back():
        with torch.no_grad():
            t.copy_(torch.from_numpy(flat).reshape(t.shape))

    return WorkBuffer(flat, HOST_OPS, write_back)


def _device_staged_work(x) -> WorkBuffer:
    """MPI is not CUDA-aware: copy to host, reduce there, copy back (the one staging path)."""
    if array_kind(x) == "cupy":
        flat = cupy.asnumpy(x).astype(np.float32 if dtype_name(x) in HALF_DTYPES else x.dtype).reshape(-1)

        def write_back():
            x[...] = cupy.asarray(flat.reshape(x.shape)).astype(x.dtype)
    else:
        host_dtype = torch.float32 if dtype_name(x) in HALF_DTYPES else x.dtype
        staged = torch.empty(x.shape, dtype=host_dtype, pin_memory=True)
        staged.copy_(x.detach())
        flat = staged.reshape(-1).numpy()

        def write_back():
            with torch.no_grad():
                x.copy_(staged, non_blocking=False)
    return WorkBuffer(flat, HOST_OPS, write_back)


def _device_direct_work(x) -> WorkBuffer:
    """MPI is CUDA-aware: the device memory itself is the work buffer (copied only if needed)."""
    half = dtype_name(x) in HALF_DTYPES
    ops = device_ops(x)
    if array_kind(x) == "cupy":
        flat = x.astype(cupy.float32).reshape(-1) if half else cupy.ascontiguousarray(x).reshape(-1)
        needs_copy = half or not x.flags.c_contiguous

        def write_back():
            x[...] = flat.reshape(x.shape).astype(x.dtype)
    else:
        flat = x.detach().to(torch.float32).reshape(-1) if half else x.detach().contiguous().reshape(-1)
        needs_copy = half or not x.is_contiguous()

        def write_back():
            with torch.no_grad():
                x.copy_(flat.reshape(x.shape))
    return WorkBuffer(flat, ops, write_back if needs_copy else None)


def work_buffer(x: Any, *, writable: bool = True) -> WorkBuffer:
    """A flat contiguous work buffer for ``x`` (see the module docstring for the rules)."""
    check_dtype(x)
    kind = array_kind(x)
    if writable and kind == "numpy" and not x.flags.writeable:
        raise ConfigError("cannot reduce in place into a read-only numpy array")
    if kind == "numpy":
        return _numpy_work(x)
    if kind == "torch" and not x.is_cuda:
        return _torch_host_work(x)
    synchronize(x)
    if _cuda_aware():
        return _device_direct_work(x)
    return _device_staged_work(x)


def clone(x: Any) -> Any:
    """A new array of the same kind, dtype, shape and device (the target of the out-of-place API)."""
    kind = array_kind(x)
    if kind == "torch":
        return x.detach().clone(memory_format=torch.contiguous_format)
    if kind == "cupy":
        return cupy.array(x, copy=True, order="C")
    return np.array(x, copy=True, order="C")


def numel(x: Any) -> int:
    return math.prod(x.shape)


# --------------------------------------------------------------------------------------------
# Fused buckets: arrays <-> flat buffers
# --------------------------------------------------------------------------------------------

def _numpy_view_of(tensor: Any) -> Optional[np.ndarray]:
    """A CPU tensor's memory as numpy, to read (None on a device, or for bfloat16, which numpy lacks): a
    fused bucket's copy in through numpy costs half of torch's for the small tensors of a model."""
    if not tensor.is_cpu or tensor.dtype is torch.bfloat16:
        return None
    return tensor.detach().numpy()


def copy_into_flat(dst, arr) -> None:
    """dst (a 1-D slice of a fusion buffer, numpy or device) <- arr flattened, cast if needed."""
    src_kind = array_kind(arr)
    if isinstance(dst, np.ndarray):
        if src_kind == "numpy":
            dst[...] = arr.reshape(-1)
        elif src_kind == "torch" and (view := _numpy_view_of(arr)) is not None:
            dst[...] = view.reshape(-1)
        elif src_kind == "torch":
            torch.from_numpy(dst).copy_(arr.detach().reshape(-1))
        else:
            dst[...] = cupy.asnumpy(arr.reshape(-1))
    elif src_kind == "torch":
        dst.copy_(arr.detach().reshape(-1))
    else:
        dst[...] = arr.reshape(-1)


def copy_from_flat(arr, src, divisor: int = 1) -> None:
    """arr <- src / divisor (src a 1-D slice of a fusion buffer), reshaped and cast back to arr's
    dtype. Dividing while copying saves the separate pass over the buffer that op="mean" needs."""
    kind = array_kind(arr)
    if kind == "numpy":
        if divisor == 1:  # a plain copy: true division would round int64 through float64
            np.copyto(arr, src.reshape(arr.shape), casting="unsafe")
        else:
            np.divide(src.reshape(arr.shape), divisor, out=arr, casting="unsafe")
    elif kind == "torch":  # through torch, which counts the write (autograd's check) and refuses overlaps
        src = torch.from_numpy(src.reshape(arr.shape)) if isinstance(src, np.ndarray) else src.reshape(arr.shape)
        with torch.no_grad():
            if divisor == 1:
                arr.copy_(src)
            else:
                torch.div(src.to(arr.device), divisor, out=arr)
    elif divisor == 1:
        arr[...] = cupy.asarray(src).reshape(arr.shape).astype(arr.dtype)
    else:
        cupy.divide(cupy.asarray(src).reshape(arr.shape), divisor, out=arr, casting="unsafe")


def cat_tensors_into(flat: np.ndarray, tensors: Sequence[Any]) -> None:
    """flat <- CPU tensors of flat's dtype, flattened one after the other, in one torch call."""
    with torch.no_grad():
        torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors], out=torch.from_numpy(flat))


def split_tensors_from(flat: np.ndarray, tensors: Sequence[Any], sizes: Sequence[int], divisor: int = 1) -> None:
    """CPU tensors of flat's dtype <- their consecutive slices of flat (of ``sizes`` elements) / divisor, in
    one torch call: an in-place torch copy, which counts the write (autograd's check) and refuses a
    tensor that overlaps itself. Tensors that share memory (one given twice, views of one buffer) are
    written as separate copies would be, the last one winning: never divided twice."""
    pieces = torch.from_numpy(flat).split(list(sizes))
    sources = [p if t.dim() == 1 else p.view(t.shape) for p, t in zip(pieces, tensors)]
    tensors = list(tensors)
    with torch.no_grad():
        if divisor == 1:
            torch._foreach_copy_(tensors, sources)
        elif not _overlapping(tensors):
            torch._foreach_copy_(tensors, sources)  # each its own memory: divided in place, once
            torch._foreach_div_(tensors, divisor)
        else:  # flat may be a shared window's result: divided on the way, not in place
            torch._foreach_copy_(tensors, torch._foreach_div(sources, divisor))


def _overlapping(tensors: Sequence[Any]) -> bool:
    """Whether the memory spans of any two tensors overlap (by address: views of one buffer, however made)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.element_size() * (1 + sum((n - 1) * s for n, s in
                                                                           zip(t.shape, t.stride()))))
                   for t in tensors if t.numel())
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def reduction_dtype(name: str) -> str:
    """The dtype a buffer of dtype ``name`` is reduced in (float32 for half precision)."""
    return "float32" if name in HALF_DTYPES else name


def placement(x: Any) -> tuple:
    """(kind, device) of an array: arrays fused together must share both."""
    kind = array_kind(x)
    return kind, str(x.device) if kind == "torch" else kind


def device_ops(x: Any):
    """The operations on work buffers in the device memory of ``x`` (for CUDA-aware MPI)."""
    return CupyOps() if array_kind(x) == "cupy" else TorchDeviceOps(x.device)


def _cuda_aware() -> bool:
    """Whether MPI takes device memory: :mod:`mpisgd.devices` builds on this module (GPU counts), so it is
    asked at call time, for device arrays only."""
    return importlib.import_module("mpisgd.devices").cuda_awareness().cuda_aware


#: names that moved out of this module; ``mpisgd.arrays.X`` (and ``mpisgd.backend.X``) still finds them
_MOVED = {"CudaAwareness": "mpisgd.devices", "cuda_awareness": "mpisgd.devices", "select_device": "mpisgd.devices",
          "FusionBucket": "mpisgd.comm.fusion", "fusion_buckets": "mpisgd.comm.fusion"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
