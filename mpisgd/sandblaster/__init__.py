"""Sandblaster L-BFGS (Dean et al. 2012): the coordinator rank, shard ranks and worker ranks of
`mpisgd.sandblaster.job.train_sandblaster`, and the MPI-free optimizer they run (`lbfgs`)."""
