"""Single-process logic of the communication layer (no mpiexec needed)."""

import re

import numpy as np
import pytest
import torch

from mpisgd import arrays as backend
from mpisgd import devices
from mpisgd.bench import parse_size, parse_sizes
from mpisgd.comm import AllreduceConfig, block_bounds
from mpisgd.comm.algorithms import segments
from mpisgd.errors import ConfigError


@pytest.mark.parametrize("n, parts", [(0, 4), (1, 4), (3, 4), (5, 4), (1_000_003, 3), (8, 8)])
def test_block_bounds_cover_everything_in_near_equal_blocks(n, parts):
    bounds = block_bounds(n, parts)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == n and len(sizes) == parts
    assert sizes.max() - sizes.min() <= 1 and list(sizes) == sorted(sizes, reverse=True)


@pytest.mark.parametrize("length, segment", [(0, 4), (16, 4), (17, 4), (29, 4), (10, 0), (5, 1)])
def test_segments_cut_a_message_into_contiguous_pieces(length, segment):
    pieces = segments(length, segment)
    assert pieces[0][0] == 0 and pieces[-1][1] == length
    assert all(b == a2 for (_, b), (a2, _) in zip(pieces, pieces[1:]))
    if segment == 0 or length <= 4 * segment:
        assert pieces == [(0, length)]  # short messages go whole: no per-piece cost
    else:
        assert all(b - a == segment for a, b in pieces[:-1]) and 0 < pieces[-1][1] - pieces[-1][0] <= segment


def test_parse_sizes():
    assert parse_size("4KiB") == 4096 and parse_size("64MiB") == 64 << 20 and parse_size("100") == 100
    assert parse_sizes("4KiB:32KiB") == [4096, 8192, 16384, 32768]
    assert parse_sizes("1MiB,2MiB") == [1 << 20, 2 << 20]
    for bad in ("4XB", "", "0", "64MiB:4KiB"):
        with pytest.raises(ConfigError):
            parse_sizes(bad)


def test_allreduce_config_validation(monkeypatch):
    with pytest.raises(ConfigError, match="non_power_of_two"):
        AllreduceConfig(non_power_of_two="tree")
    with pytest.raises(ConfigError, match="native_below_bytes"):
        AllreduceConfig(native_below_bytes=-1)
    with pytest.raises(ConfigError, match="segment_bytes"):
        AllreduceConfig(segment_bytes=-1)
    monkeypatch.setenv("MPISGD_AUTO_NATIVE_BELOW", "12345")
    monkeypatch.setenv("MPISGD_CHECK_COLLECTIVES", "0")
    cfg = AllreduceConfig()
    assert cfg.native_below_bytes == 12345 and cfg.check_collectives is False
    monkeypatch.setenv("MPISGD_CHECK_COLLECTIVES", "maybe")
    with pytest.raises(ConfigError, match="MPISGD_CHECK_COLLECTIVES"):
        AllreduceConfig()


def test_cuda_aware_override(monkeypatch):
    devices.cuda_awareness.cache_clear()
    try:
        monkeypatch.setenv("MPISGD_CUDA_AWARE", "1")
        assert devices.cuda_awareness() == devices.CudaAwareness(True, "MPISGD_CUDA_AWARE=1")
        devices.cuda_awareness.cache_clear()
        monkeypatch.setenv("MPISGD_CUDA_AWARE", "0")
        assert devices.cuda_awareness() == devices.CudaAwareness(False, "MPISGD_CUDA_AWARE=0")
        devices.cuda_awareness.cache_clear()
        monkeypatch.setenv("MPISGD_CUDA_AWARE", "yes")
        with pytest.raises(ConfigError, match="0 or 1"):
            devices.cuda_awareness()
        devices.cuda_awareness.cache_clear()
        monkeypatch.delenv("MPISGD_CUDA_AWARE")
        answer = devices.cuda_awareness()  # asks the loaded MPI library itself
        # the answer says which query decided, and agrees with the value that query returned
        returned = re.fullmatch(r"MPIX_(?:GPU_query_support\(CUDA\)|Query_cuda_support\(\)) returned (-?\d+)", answer.how)
        kinds = re.fullmatch(r"mpi_memory_alloc_kinds = '(.*)'", answer.how)
        if returned:
            assert answer.cuda_aware is (int(returned.group(1)) != 0)
        elif kinds:
            assert answer.cuda_aware is ("cuda" in kinds.group(1))
        else:
            assert answer == devices.NO_ANSWER
    finally:
        devices.cuda_awareness.cache_clear()


def test_cuda_awareness_asks_the_library_then_the_info_key_then_assumes_host_only(monkeypatch):
    monkeypatch.delenv("MPISGD_CUDA_AWARE", raising=False)
    by_symbol = devices.CudaAwareness(True, "symbol")
    by_info = devices.CudaAwareness(True, "info key")
    cases = [(by_symbol, by_info, by_symbol), (None, by_info, by_info), (None, None, devices.NO_ANSWER)]
    try:
        for symbols, info, expected in cases:
            devices.cuda_awareness.cache_clear()
            monkeypatch.setattr(devices, "_query_symbols", lambda path, answer=symbols: answer)
            monkeypatch.setattr(devices, "_query_alloc_kinds", lambda answer=info: answer)
            assert devices.cuda_awareness() == expected
        assert devices.NO_ANSWER.cuda_aware is False  # staging is always correct
    finally:
        devices.cuda_awareness.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_work_buffer_is_float32_and_written_back(dtype):
    t = torch.tensor([1.5, -2.25, 3.0], dtype=dtype)
    work = backend.work_buffer(t)
    assert work.flat.dtype == np.float32
    work.flat *= 2
    work.finish()
    assert t.dtype == dtype and t.tolist() == [3.0, -4.5, 6.0]


def test_contiguous_inputs_are_zero_copy():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert backend.work_buffer(x).write_back is None and np.shares_memory(backend.work_buffer(x).flat, x)
    t = torch.arange(6, dtype=torch.float64)
    assert backend.work_buffer(t).write_back is None


def test_gpu_mapping_errors_without_gpu():
    if devices.gpu_count():
        pytest.skip("a GPU is visible; this checks the no-GPU error")
    assert devices.select_device(0, 1, want_gpu=False) == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        devices.select_device(0, 1, want_gpu=True)


def test_gpus_are_mapped_by_node_local_rank(monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 2)
    assert [devices.select_device(r, 2, want_gpu=True) for r in range(2)] == ["cuda:0", "cuda:1"]
    with pytest.raises(ConfigError, match="3 ranks on this node but only 2"):
        devices.select_device(0, 3, want_gpu=True)
    assert devices.select_device(2, 3, want_gpu=True, share_gpus=True) == "cuda:0"


def test_old_names_of_moved_functions_still_resolve():
    assert backend.select_device is devices.select_device and backend.cuda_awareness is devices.cuda_awareness
