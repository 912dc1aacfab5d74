"""Synchronous SGD on the parameter server with backup workers (Chen et al. 2016, "Revisiting Distributed
Synchronous SGD"): ``--strategy sync-ps --backup-workers b``. Each step, every shard applies the mean of
the first N-b of the N workers' gradients for that step and discards the late ones, so b stragglers
cost nothing. Built on Downpour's windows, board and coordinator (:class:`mpisgd.downpour.job.System`).
"""

from mpisgd.syncps.job import SYNC_PS, train_syncps

__all__ = ["SYNC_PS", "train_syncps"]
