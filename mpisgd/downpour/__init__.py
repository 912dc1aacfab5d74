"""Parameter server: shard layout and roles (shared by Downpour/DC-ASGD and Sandblaster), the RMA windows
of the shards, the client side (pull parameters, push gradients), the server side (take, check, apply,
publish) and the server update rules (sgd, adagrad) with DC-ASGD's delay compensation."""

from mpisgd.downpour.client import NonFinitePushError, ParameterClient
from mpisgd.downpour.rules import RULES, AdagradRule, DelayCompensation, SGDRule, UpdateRule, make_rule
from mpisgd.downpour.server import ShardServer
from mpisgd.downpour.windows import (
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
    ParameterServerWindows,
)
from mpisgd.training.layout import COORDINATOR, SERVER, WORKER, Roles, ShardLayout

__all__ = ["COORDINATOR", "DONE", "DRAINING", "FAILED", "FINISHED", "RULES", "RUNNING", "SERVER",
           "STALENESS_BINS", "STOPPING", "STOP_REASONS", "TRAINING", "WORKER", "AdagradRule", "BoardLayout",
           "DelayCompensation", "NonFinitePushError", "ParameterClient", "ParameterServerWindows", "Roles",
           "SGDRule", "ShardLayout", "ShardServer", "UpdateRule", "make_rule"]
