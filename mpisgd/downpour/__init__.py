"""Downpour SGD and DC-ASGD on a sharded parameter server over one-sided MPI (Dean et al. 2012; Zheng et
al. 2017): shard layout and roles (shared with Sandblaster), the RMA windows of the shards, the job board,
the client side (pull parameters, push gradients), the server side (take, check, apply, publish), the
server update rules (sgd, adagrad), DC-ASGD's delay compensation, the worker loop, server 0's
coordination and the job (:func:`mpisgd.downpour.job.train_downpour`)."""

from mpisgd.downpour.board import (
    DONE,
    DRAINING,
    FAILED,
    FINISHED,
    RUNNING,
    STALENESS_BINS,
    STOP_REASONS,
    STOPPING,
    TRAINING,
    BoardLayout,
    Header,
    JobBoard,
    Phase,
    RowField,
    StopReason,
    WorkerState,
)
from mpisgd.downpour.client import NonFinitePushError, ParameterClient
from mpisgd.downpour.delay_compensation import DelayCompensation
from mpisgd.downpour.rules import RULES, AdagradRule, SGDRule, UpdateRule, make_rule
from mpisgd.downpour.server import ShardServer
from mpisgd.downpour.windows import Counter, ParameterServerWindows
from mpisgd.training.layout import COORDINATOR, SERVER, WORKER, Roles, ShardLayout

__all__ = ["COORDINATOR", "DONE", "DRAINING", "FAILED", "FINISHED", "RULES", "RUNNING", "SERVER",
           "STALENESS_BINS", "STOPPING", "STOP_REASONS", "TRAINING", "WORKER", "AdagradRule", "BoardLayout",
           "Counter", "DelayCompensation", "Header", "JobBoard", "NonFinitePushError", "ParameterClient",
           "ParameterServerWindows", "Phase", "Roles", "RowField", "SGDRule", "ShardLayout", "ShardServer",
           "StopReason", "UpdateRule", "WorkerState", "make_rule"]
