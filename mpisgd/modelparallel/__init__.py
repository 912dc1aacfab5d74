"""Model parallelism (DistBelief, Dean et al. 2012): one replica split across ranks, replicas side by side.

| module | holds |
|--------|-------|
| ``model_parallel`` | :class:`ModelParallel`, the user-facing object (train_step, state with global names) |
| ``partition`` | where to cut a Sequential into stages (``params``, ``time``, ``uniform``, a list) |
| ``grid`` | world = replicas x stages x splits, and the communicators of each |
| ``schedules`` | GPipe and 1F1B as lists of actions (no MPI) |
| ``transport`` | nonblocking activations/gradients between stages, failure notices, deadlines |
| ``stage`` | one stage running its actions |
| ``tensor_parallel`` | Linear layers split by output features over T ranks |
| ``state`` | checkpoints with the unsplit model's names |
| ``trainer`` | ``train_model_parallel(cfg, comm)``, the CLI's entry point |
| ``slices`` | which elements of the unsplit flat parameter vector a partition holds |
| ``partition_client`` | a partition's pulls and pushes of its slice on the parameter-server shards |
| ``downpour`` | Downpour/DC-ASGD with split replicas (``--strategy downpour --stages K``) |
"""

from mpisgd.modelparallel.grid import Coordinates, GridShape
from mpisgd.modelparallel.model_parallel import ModelParallel
from mpisgd.modelparallel.partition import BALANCES, layer_counts, resolve_balance
from mpisgd.modelparallel.schedules import (
    SCHEDULES,
    Action,
    ActionKind,
    GPipe,
    OneForwardOneBackward,
    PipelineSchedule,
    make_schedule,
)
from mpisgd.modelparallel.state import unsplit_optimizer_state
from mpisgd.modelparallel.transport import StageMismatchError

__all__ = ["BALANCES", "SCHEDULES", "Action", "ActionKind", "Coordinates", "GPipe", "GridShape", "ModelParallel",
           "OneForwardOneBackward", "PipelineSchedule", "StageMismatchError", "layer_counts", "make_schedule",
           "resolve_balance", "unsplit_optimizer_state"]
