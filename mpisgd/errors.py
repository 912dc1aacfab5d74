"""Exception types: one base class so callers can catch everything mpisgd raises on purpose.

``every_rank`` is declared here, per class: True where every rank of the job raises the same error
together (the CLI then prints it on each rank and exits without aborting the job); False where only
the rank that saw the problem raises (the CLI then aborts the job, so no rank waits for it).
"""


class MpisgdError(Exception):
    """Base class of every error mpisgd raises deliberately."""

    every_rank = False


class ConfigError(MpisgdError, ValueError):
    """Invalid user input: a flag, a config value, a data file. The CLI exits with code 2."""


class SharedConfigError(ConfigError):
    """Invalid input that every rank found together (the ranks agreed on it before raising)."""

    every_rank = True


class CheckpointError(ConfigError):
    """A checkpoint file failed verification (checksum, truncation, format version, world layout); the
    message names the file and the reason. Every rank reads the same file, so every rank raises it."""


class CommError(MpisgdError, RuntimeError):
    """A communication failed or ranks disagreed about a collective."""


class CollectiveTimeout(CommError):
    """No progress in a collective for the collective timeout: every live rank raises it, naming the
    ranks that have not arrived (or stopped answering), the collective and the step. Under the ``mpisgd``
    command the job then aborts (the missing ranks may never exit by themselves) with exit code 4. Its
    subclass :class:`UnfinishedCollective` is raised by this rank alone, for a later collective."""

    every_rank = True
    #: the exit code of a job ended by it (also of one whose blocking MPI call outlived the timeout)
    exit_code = 4


class UnfinishedCollective(CollectiveTimeout):
    """A collective was called on a communicator whose earlier collective never finished on this rank (it
    timed out, or its wait was interrupted, e.g. by Ctrl-C). MPI cannot cancel a collective, so any later
    one on that communicator would be matched with the wrong calls of the other ranks (or restart a
    request still active): it is refused instead, naming the unfinished one. End the job."""

    every_rank = False  # only the ranks that left the earlier one unfinished know


class CollectiveMismatchError(CommError):
    """The ranks called a collective with different arguments; detected and raised on every rank."""

    every_rank = True


class JobFailedError(MpisgdError, RuntimeError):
    """A failure one rank saw and told every other rank about; raised on every rank with the same text."""

    every_rank = True
