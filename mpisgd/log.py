"""Logging for the library: every module logs through ``logging.getLogger(__name__)``; the CLI calls
:func:`setup_logging` once so each line names its rank (many ranks write to one terminal or Slurm file).
Library users who never call it get Python's usual behaviour: warnings and errors to stderr."""

from __future__ import annotations

import logging
import sys
from typing import Optional

LEVELS = ("debug", "info", "warning", "error")
_HANDLER_NAME = "mpisgd-rank"


class RankFormatter(logging.Formatter):
    """``mpisgd [rank 3] warning: text`` (rank omitted in a single-process job)."""

    def __init__(self, rank: Optional[int], size: int) -> None:
        super().__init__()
        self.prefix = f"mpisgd [rank {rank}]" if rank is not None and size > 1 else "mpisgd"

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.prefix} {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: str = "info", *, rank: Optional[int] = None, size: int = 1) -> None:
    """Send the ``mpisgd`` loggers to stderr at ``level``, each line prefixed with the rank."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; valid levels: {', '.join(LEVELS)}")
    logger = logging.getLogger("mpisgd")
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(RankFormatter(rank, size))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def flush() -> None:
    """Flush the rank's log lines (before an abort, so they reach the launcher)."""
    for handler in logging.getLogger("mpisgd").handlers:
        handler.flush()
    sys.stderr.flush()
