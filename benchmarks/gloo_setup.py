"""torch.distributed (gloo) on the ranks of an MPI job, for side-by-side anchor measurements."""

import gc
import socket

import torch.distributed as dist


def init_gloo(comm) -> None:
    """Rendezvous on loopback: rank 0 picks a free port and tells the others through MPI."""
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.mpi.bcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank,
                            world_size=comm.size)


def close_gloo() -> None:
    """Free the caller's dropped DDP objects, then the group: the order that cannot hang.

    DDP's reducer lives in reference cycles. Left to the garbage collector, it may be freed after
    destroy_process_group, and gloo's destructor then joins a thread that waits for the GIL the
    freeing thread holds (a hang at exit, seen under Open MPI). The caller deletes its references
    to the DDP model first.
    """
    gc.collect()
    dist.destroy_process_group()
