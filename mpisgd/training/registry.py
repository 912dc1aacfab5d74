"""The training strategies as one table: name -> the function that runs it and the config section it reads.

| strategy      | paper                                   | section       |
|---------------|-----------------------------------------|---------------|
| `sync`        | Goyal et al. 2017 (+ LARS)              | `sync`        |
| `downpour`    | Dean et al. 2012 (Downpour SGD)         | `downpour`    |
| `dcasgd`      | Zheng et al. 2017 (delay compensation)  | `downpour`    |
| `sandblaster` | Dean et al. 2012 (Sandblaster L-BFGS)   | `sandblaster` |
| `sync-ps`     | Chen et al. 2016 (backup workers)       | `syncps`      |

Every strategy also reads the common section. Entries name their module rather than import it, so
that reading the table (the config does, to validate ``--strategy``) loads neither torch nor MPI.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:
    from mpisgd.comm import Communicator
    from mpisgd.training.config import TrainConfig


class Strategy(Protocol):
    """A training strategy: runs on every rank of ``comm`` and returns the same summary on each.

    The summary is a dict with at least ``steps`` and ``stopped`` (why training ended), usually
    ``val_accuracy``; any other key is kept in :attr:`TrainResult.extra`.
    """

    def __call__(self, cfg: TrainConfig, comm: Communicator) -> dict: ...


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    paper: str
    section: str  # the TrainConfig section it reads besides the common one
    module: str
    function: str

    def load(self) -> Strategy:
        return getattr(importlib.import_module(self.module), self.function)


STRATEGIES: dict[str, StrategyEntry] = {entry.name: entry for entry in (
    StrategyEntry("sync", "Goyal et al. 2017", "sync", "mpisgd.sync.trainer", "train_sync"),
    StrategyEntry("downpour", "Dean et al. 2012", "downpour", "mpisgd.downpour.job", "train_downpour"),
    StrategyEntry("dcasgd", "Zheng et al. 2017", "downpour", "mpisgd.downpour.job", "train_downpour"),
    StrategyEntry("sandblaster", "Dean et al. 2012", "sandblaster", "mpisgd.sandblaster.job", "train_sandblaster"),
    StrategyEntry("sync-ps", "Chen et al. 2016", "syncps", "mpisgd.syncps.job", "train_syncps"),
)}


def strategies_reading(section: str) -> tuple:
    """The names of the strategies that read config section ``section``."""
    return tuple(name for name, entry in STRATEGIES.items() if entry.section == section)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports (the same on every rank).

    Attributes:
        strategy: the strategy that ran.
        steps: optimizer steps (pushes in downpour/dcasgd, iterations in sandblaster).
        stopped: why training ended ("epochs", "max_steps", "target_accuracy", or the strategy's own).
        val_accuracy: validation accuracy of the final model; None without a validation set.
        wall_time_s: seconds the strategy ran on this rank.
        extra: the strategy's other summary fields (e.g. ``global_batch``, ``servers``, ``train_objective``).
    """

    strategy: str
    steps: int
    stopped: str
    val_accuracy: Optional[float] = None
    wall_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_summary(cls, strategy: str, summary: dict, wall_time_s: float) -> TrainResult:
        rest = {key: value for key, value in summary.items() if key not in ("steps", "stopped", "val_accuracy")}
        return cls(strategy, int(summary["steps"]), str(summary["stopped"]), summary.get("val_accuracy"),
                   wall_time_s, rest)

    def as_dict(self) -> dict:
        """The summary as the strategies return it, plus ``strategy`` and ``wall_time_s``."""
        return {"strategy": self.strategy, "steps": self.steps, "stopped": self.stopped,
                "val_accuracy": self.val_accuracy, "wall_time_s": self.wall_time_s, **self.extra}

    def finished_line(self) -> str:
        """The line the ``mpisgd train`` command prints as its result."""
        accuracy = "n/a" if self.val_accuracy is None else f"{self.val_accuracy:.4f}"
        return (f"mpisgd train: {self.strategy} finished after {self.steps} steps ({self.stopped}); "
                f"validation accuracy {accuracy}")

    def __getitem__(self, key: str) -> Any:
        """``result["steps"]``, ``result["global_batch"]``: read like the summary dicts of earlier versions."""
        return self.as_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)


def run_strategy(cfg: TrainConfig, comm: Communicator) -> TrainResult:
    """Run ``cfg.strategy`` on ``comm``; returns its result (the same on every rank)."""
    entry = STRATEGIES[cfg.strategy]  # the config admits only names of this table
    start = time.perf_counter()
    summary = entry.load()(cfg, comm)
    return TrainResult.from_summary(entry.name, summary, time.perf_counter() - start)
