"""The one place that reads ``MPISGD_*`` environment variables, each declared once with its meaning.

A malformed value is a :class:`~mpisgd.errors.ConfigError` naming the variable; since every rank of a
job gets the same environment from the launcher, every rank raises it together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

from mpisgd.errors import ConfigError

Value = Union[int, float, bool, str]


@dataclass(frozen=True)
class Variable:
    name: str
    parse: Callable[[str, str], Value]
    meaning: str


def _integer(name: str, raw: str) -> Value:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {raw!r}")
    return value


def _seconds(name: str, raw: str) -> Value:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{name} must be a number of seconds >= 0, got {raw!r}")
    return value


def _flag(name: str, raw: str) -> Value:
    if raw not in ("0", "1"):
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _choice(*choices: str) -> Callable[[str, str], Value]:
    def parse(name: str, raw: str) -> Value:
        if raw not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw
    return parse


def _text(name: str, raw: str) -> Value:
    return raw


VARIABLES = {v.name: v for v in [
    Variable("MPISGD_DATA_DIR", _text, "where the built-in data set is generated (default ~/.cache/mpisgd)"),
    Variable("MPISGD_CUDA_AWARE", _flag, "override the detection of CUDA-aware MPI"),
    Variable("MPISGD_HOROVOD_SPECULATION", _choice("auto", "on", "off"),
             "mpisgd.horovod: a repeated small allreduce travels in one message, without a negotiation "
             "(auto: on)"),
    Variable("MPISGD_SHM", _flag, "allow the shared-memory window (shm, hier) on one node"),
    Variable("MPISGD_ALLOW_SINGLETON", _flag,
             "run as one rank even where the launcher's variables (PMI_SIZE, OMPI_COMM_WORLD_SIZE, "
             "SLURM_STEP_NUM_TASKS) say it started several tasks"),
    Variable("MPISGD_AUTO_NATIVE_BELOW", _integer, "auto: MPI's own Allreduce below this many bytes"),
    Variable("MPISGD_AUTO_SHM_BELOW", _integer, "auto: the shared window for single vectors below this many bytes"),
    Variable("MPISGD_SHM_AREA_BYTES", _integer, "bytes of the shared window's slot per rank"),
    Variable("MPISGD_AUTO_NON_POWER_OF_TWO", _choice("ring", "rhd"),
             "auto: the large-message algorithm when the process count is not a power of two"),
    Variable("MPISGD_HIERARCHICAL", _flag, "auto: hier across equal nodes"),
    Variable("MPISGD_CHECK_COLLECTIVES", _flag, "verify that every rank called a collective alike"),
    Variable("MPISGD_YIELD_WHEN_WAITING", _choice("auto", "0", "1"),
             "waits yield the CPU instead of spinning (auto: when ranks outnumber cores)"),
    Variable("MPISGD_SEGMENT_BYTES", _integer, "rhd/ring reduce what they receive in pieces of this size"),
    Variable("MPISGD_COLLECTIVE_TIMEOUT", _seconds,
             "seconds a collective may make no progress before every live rank raises CollectiveTimeout "
             "(default 600; 0: no watchdog, waits block in MPI)"),
    Variable("MPISGD_STALL_WARNING", _seconds,
             "seconds a collective may wait before every waiting rank logs who has not arrived (default 60; 0: never)"),
    Variable("MPISGD_PS_IDLE_SLEEP", _seconds, "how long an idle parameter server sleeps between polls"),
    Variable("MPISGD_EMULATED_STEP_SECONDS", _seconds,
             "benchmarks (mpisgd/emulation.py): pad each training forward pass with this sleep, an emulated "
             "accelerator's compute time"),
    Variable("MPISGD_EMULATED_SLOW_RANKS", _text,
             "benchmarks (mpisgd/emulation.py): rank:factor[,...], those world ranks' emulated steps take factor x"),
    Variable("MPISGD_SANDBLASTER_FAULT", _text, "test-only (mpisgd/faults.py): rank:portion:exit|freeze|straggle"),
    Variable("MPISGD_TEST_CHECKPOINT_FAULT", _text,
             "test-only (mpisgd/faults.py): stage[:n], SIGKILL this process at that stage of its n-th checkpoint write"),
    Variable("MPISGD_TEST_SIGNAL_AT", _text,
             "test-only (mpisgd/faults.py): step:signal[:ranks], a rank sends itself the signal after that step"),
    Variable("MPISGD_TEST_EVALUATION_FAULT", _text,
             "test-only (mpisgd/faults.py): rank:n:freeze|slow|raise|sleep[:seconds], at that rank's n-th evaluation "
             "(from 0)"),
    Variable("MPISGD_TEST_SHARD_GATHER_FAULT", _text,
             "test-only (mpisgd/faults.py): rank:n:freeze|slow|raise|sleep[:seconds], as that parameter server's "
             "n-th gather of the shards (from 0) starts"),
    Variable("MPISGD_TEST_MODEL_PARALLEL_FAULT", _text,
             "test-only (mpisgd/faults.py): rank:step:freeze|slow|raise|sleep[:seconds], before that model-parallel "
             "step's pipeline"),
    Variable("MPISGD_TEST_SYNC_FAULT", _text, "test-only fault in DistributedOptimizer.step (mpisgd/faults.py): "
             "rank:step:freeze|slow|raise|sleep|exit|nan[:seconds]"),
    Variable("MPISGD_TEST_WORKER_FAULT", _text,
             "test-only fault of a Downpour worker (mpisgd/faults.py): rank:step:action[:seconds]"),
]}


def read(name: str, default: Optional[Value] = None) -> Optional[Value]:
    """The parsed value of the declared variable ``name``, or ``default`` when it is unset or empty."""
    variable = VARIABLES[name]
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return variable.parse(name, raw)


def mpi_uses_network_path() -> bool:
    """The MPI library told to use its network path between ranks of one machine: MPICH's
    ``MPIR_CVAR_NOLOCAL=1``, or Open MPI's one-sided component set to one other than osc/sm
    (``OMPI_MCA_osc=rdma``, ``ucx``, ``^sm``), whose RMA progresses only while the target enters MPI."""
    if os.environ.get("MPIR_CVAR_NOLOCAL", "0").lower() not in ("0", "", "false", "no"):
        return True
    osc = os.environ.get("OMPI_MCA_osc", "").replace(" ", "")
    if not osc:
        return False
    if osc.startswith("^"):
        return "sm" in osc[1:].split(",")
    return "sm" not in osc.split(",")
