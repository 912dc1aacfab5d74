"""GPU buffers through the all-reduce: torch CUDA and cupy, with and without CUDA-aware MPI.

Skipped, with the reason, where no GPU is visible. The reference is MPI_Allreduce of the same
values on host memory.
"""

import os

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpisgd
from mpisgd import devices

WORLD = MPI.COMM_WORLD
P, RANK = WORLD.Get_size(), WORLD.Get_rank()

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (CPU-only machine)")


@pytest.fixture(params=["staged", "cuda-aware"])
def mpi_mode(request, monkeypatch):
    """Force host staging, or trust the detected/overridden CUDA-awareness."""
    devices.cuda_awareness.cache_clear()
    if request.param == "staged":
        monkeypatch.setenv("MPISGD_CUDA_AWARE", "0")
    elif not devices.cuda_awareness().cuda_aware and os.environ.get("MPISGD_CUDA_AWARE") != "1":
        pytest.skip(f"MPI is not CUDA-aware here ({devices.cuda_awareness().how})")
    yield request.param
    devices.cuda_awareness.cache_clear()


def host_reference(values: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    WORLD.Allreduce(values, out)
    return out


@needs_cuda
@pytest.mark.parametrize("algorithm", ["rhd", "ring", "native", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_cuda_allreduce(mpi_mode, algorithm, dtype):
    device = devices.select_device(mpisgd.get_communicator().local_rank, mpisgd.get_communicator().local_size,
                                   want_gpu=True, share_gpus=True)
    values = np.random.default_rng(RANK).standard_normal(1001)
    t = torch.tensor(values, dtype=dtype, device=device)
    result = mpisgd.allreduce(t, algorithm=algorithm)
    assert result.is_cuda and result.dtype == dtype
    expected = host_reference(t.to(torch.float64).cpu().numpy())
    tol = 1e-5 * P if dtype == torch.float32 else 2e-2 * P
    np.testing.assert_allclose(result.to(torch.float64).cpu().numpy(), expected, rtol=tol, atol=tol)


@needs_cuda
def test_cupy_allreduce(mpi_mode):
    cupy = pytest.importorskip("cupy", reason="cupy not installed")
    values = np.random.default_rng(RANK).standard_normal(1001).astype(np.float32)
    x = cupy.asarray(values)
    mpisgd.allreduce_(x, algorithm="rhd")
    np.testing.assert_allclose(cupy.asnumpy(x), host_reference(values), rtol=1e-5 * P, atol=1e-5 * P)
