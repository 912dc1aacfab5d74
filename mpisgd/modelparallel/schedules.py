"""Pipeline schedules: the order in which one stage runs the forward and backward passes of its micro-batches.

As in ``torch.distributed.pipelining``, a schedule only decides *what* a stage does next; moving
activations and gradients between stages lives in :mod:`mpisgd.modelparallel.transport` and running an
action in :mod:`mpisgd.modelparallel.stage`. A schedule is a small class over :class:`PipelineSchedule`
that lists :class:`Action` values (an :class:`ActionKind` and a micro-batch), so it can be read, printed
and tested without MPI.

| schedule | order on stage s of K, M micro-batches | activations held at once |
|----------|-----------------------------------------|--------------------------|
| ``gpipe`` | F0..F(M-1), then B0..B(M-1) (Huang et al. 2019) | M |
| ``1f1b``  | K-1-s forwards of warm-up, then one forward and one backward alternately, then the remaining backwards (Narayanan et al. 2019, PipeDream-Flush) | at most K-s |

Both have the same bubble, (K-1)/(M+K-1) of a step; 1F1B holds fewer activations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import NamedTuple

from mpisgd.errors import ConfigError


class ActionKind(Enum):
    """What a stage does with one micro-batch."""

    FORWARD = "F"
    BACKWARD = "B"


class Action(NamedTuple):
    """One step of a schedule: ``Action(ActionKind.FORWARD, 3)`` reads ``F3``."""

    kind: ActionKind
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.micro_batch}"


class PipelineSchedule(ABC):
    """The order of forward and backward actions of every stage of a pipeline.

    Args:
        stages: K, the number of pipeline stages.
        micro_batches: M, the number of micro-batches a minibatch is cut into.
    """

    name = "abstract"

    def __init__(self, stages: int, micro_batches: int) -> None:
        if stages < 1 or micro_batches < 1:
            raise ConfigError(f"a pipeline needs stages >= 1 and micro_batches >= 1, got {stages} and "
                              f"{micro_batches}")
        self.stages, self.micro_batches = stages, micro_batches

    @abstractmethod
    def actions(self, stage: int) -> list[Action]:
        """The actions of ``stage`` (0-based) in the order it runs them; each micro-batch once forward,
        then once backward."""

    def describe(self, stage: int) -> str:
        """The actions of ``stage`` as text, e.g. ``F0 F1 B0 F2 B1 B2``."""
        return " ".join(str(action) for action in self.actions(stage))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stages={self.stages}, micro_batches={self.micro_batches})"


def forward(micro_batch: int) -> Action:
    return Action(ActionKind.FORWARD, micro_batch)


def backward(micro_batch: int) -> Action:
    return Action(ActionKind.BACKWARD, micro_batch)


class GPipe(PipelineSchedule):
    """All forwards, then all backwards (GPipe, Huang et al. 2019)."""

    name = "gpipe"

    def actions(self, stage: int) -> list[Action]:
        count = range(self.micro_batches)
        return [forward(i) for i in count] + [backward(i) for i in count]


class OneForwardOneBackward(PipelineSchedule):
    """1F1B (PipeDream-Flush, Narayanan et al. 2019): after a warm-up of K-1-s forwards, stage s
    alternates one forward and one backward, so it never holds more than K-s micro-batches' activations."""

    name = "1f1b"

    def actions(self, stage: int) -> list[Action]:
        warmup = min(self.stages - 1 - stage, self.micro_batches)
        order = [forward(i) for i in range(warmup)]
        for done, next_forward in enumerate(range(warmup, self.micro_batches)):
            order += [forward(next_forward), backward(done)]
        order += [backward(i) for i in range(self.micro_batches - warmup, self.micro_batches)]
        return order


SCHEDULES: dict[str, type[PipelineSchedule]] = {cls.name: cls for cls in (GPipe, OneForwardOneBackward)}


def make_schedule(name: str, stages: int, micro_batches: int) -> PipelineSchedule:
    """The schedule called ``name`` (``gpipe`` or ``1f1b``) for K ``stages`` and M ``micro_batches``."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](stages, micro_batches)
