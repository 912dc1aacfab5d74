"""Training metrics as JSON Lines, and plots comparing runs.

Why JSONL: one self-describing object per line, appended and flushed as training goes, so a run killed at
any moment leaves a readable file, `tail -f` shows progress, and runs of different strategies (whose
extra keys differ) are compared with the same tools (`json`, pandas, `plot_metrics`). Non-finite numbers
are written as NaN / Infinity, which Python's json and pandas read back.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, TextIO, Union

PathLike = Union[str, "os.PathLike[str]"]

STANDARD_KEYS = ("step", "epoch", "loss", "val_accuracy", "lr", "samples_per_s", "wall_time")


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers so that json can write them."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


class MetricsWriter:
    """Append one JSON object per call to a JSONL file, flushed at once.

    Args:
        path: the file; its directory is created if needed.
        append: keep existing lines (resuming a run) instead of truncating; a last line cut off by a
            crash is removed. Wall time then continues from the last line's ``wall_time``, so plots
            against time stay continuous across restarts.
    """

    def __init__(self, path: PathLike, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._time_offset = 0.0
        if append and self.path.exists():
            _drop_partial_last_line(self.path)
            previous = read_metrics(self.path)
            times = [record["wall_time"] for record in previous if record.get("wall_time") is not None]
            self._time_offset = float(times[-1]) if times else 0.0
        self._file: Optional[TextIO] = open(self.path, "a" if append else "w",  # noqa: SIM115 (held open)
                                            encoding="utf-8")
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the writer was created (plus the resumed run's time with ``append=True``)."""
        return self._time_offset + time.perf_counter() - self._start

    def write(
        self,
        *,
        step: int,
        epoch: float | None = None,
        loss: float | None = None,
        val_accuracy: float | None = None,
        lr: float | None = None,
        samples_per_s: float | None = None,
        wall_time: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Write one record; keys whose value is None are left out.

        Args:
            step: optimizer steps so far.
            epoch: epoch (may be fractional).
            loss: training loss.
            val_accuracy: validation accuracy in [0, 1].
            lr: current learning rate.
            samples_per_s: throughput, all ranks together.
            wall_time: seconds since the start of the run; default `elapsed()`.
            extra: any other JSON-serializable values (strategy-specific: staleness, comm time, ...).

        Returns:
            The record written.
        """
        if self._file is None:
            raise RuntimeError(f"MetricsWriter({str(self.path)!r}) is closed")
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "val_accuracy": val_accuracy,
            "lr": lr,
            "samples_per_s": samples_per_s,
            "wall_time": self.elapsed() if wall_time is None else wall_time,
        }
        record.update(extra)
        record = {key: _plain(value) for key, value in record.items() if value is not None}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    """A run killed mid-write leaves a line without its newline; appending after it would corrupt the
    next record too, so it is cut off before a resumed run appends."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL metrics file; a last line cut off by a crash is skipped."""
    records = []
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {number + 1} is not valid JSON") from None
    return records


def _series(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple:
    points = [
        (record[x_key], record[y_key])
        for record in records
        if record.get(x_key) is not None
        and isinstance(record.get(y_key), (int, float))
        and math.isfinite(record[y_key])
    ]
    return [x for x, _ in points], [y for _, y in points]


def plot_metrics(paths: Iterable[PathLike], out_png: PathLike, *, title: str | None = None) -> Path:
    """Plot loss and validation accuracy against step and against wall time for several runs.

    One figure, each run a line labelled by its file name. Four panels; runs of the parameter-server
    strategies (records with ``updates_per_s``, ``pushes_per_worker``, ``staleness_hist``) add a row:
    updates per second of each shard against wall time, pushes per worker, and the staleness
    histogram (both from the run's last record). Uses matplotlib's Agg canvas directly (no pyplot),
    so it works headless and leaves the caller's backend alone.

    Args:
        paths: JSONL files written by `MetricsWriter`.
        out_png: the PNG to write.
        title: optional figure title.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    files = [Path(path) for path in paths]
    if not files:
        raise ValueError("plot_metrics: no metrics files given")
    runs = [(path, read_metrics(path)) for path in files]
    server_runs = [(path, records) for path, records in runs
                   if any(_PS_KEYS & record.keys() for record in records)]
    if server_runs:
        figure = Figure(figsize=(13, 11), layout="constrained")
        grid = figure.subplot_mosaic([["ls", "ls", "ls", "lt", "lt", "lt"],
                                      ["as", "as", "as", "at", "at", "at"],
                                      ["up", "up", "pw", "pw", "st", "st"]])
        axes = [[grid["ls"], grid["lt"]], [grid["as"], grid["at"]]]
    else:
        figure = Figure(figsize=(11, 7.5), layout="constrained")
        axes = figure.subplots(2, 2)
    FigureCanvasAgg(figure)
    panels = (
        (axes[0][0], "step", "loss", "training loss", "step"),
        (axes[0][1], "wall_time", "loss", "training loss", "wall time [s]"),
        (axes[1][0], "step", "val_accuracy", "validation accuracy", "step"),
        (axes[1][1], "wall_time", "val_accuracy", "validation accuracy", "wall time [s]"),
    )
    for path, records in runs:
        for axis, x_key, y_key, _, _ in panels:
            xs, ys = _series(records, x_key, y_key)
            marker = "o" if len(xs) < 30 else None
            axis.plot(xs, ys, label=path.name, marker=marker, markersize=3)
    for axis, _, y_key, y_label, x_label in panels:
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.grid(True, alpha=0.3)
        if y_key == "loss" and _all_positive(axis):
            axis.set_yscale("log")
    axes[0][0].legend(fontsize="small")
    if server_runs:
        _plot_parameter_server(grid["up"], grid["pw"], grid["st"], server_runs)
    if title:
        figure.suptitle(title)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    return out_png


_PS_KEYS = {"updates_per_s", "pushes_per_worker", "staleness_hist"}


def _last_list(records: list[dict[str, Any]], key: str) -> list:
    for record in reversed(records):
        if isinstance(record.get(key), list):
            return record[key]
    return []


def _plot_parameter_server(updates_axis: Any, pushes_axis: Any, staleness_axis: Any, runs: list) -> None:
    """Updates/s per shard against time; pushes per worker and staleness histogram of each run's end,
    as bars side by side (one group per worker or staleness value, one bar per run)."""
    from matplotlib.ticker import MaxNLocator

    width = 0.8 / len(runs)
    for number, (path, records) in enumerate(runs):
        timed = [r for r in records
                 if isinstance(r.get("updates_per_s"), list) and r.get("wall_time") is not None]
        shards = max((len(r["updates_per_s"]) for r in timed), default=0)
        for shard in range(shards):
            points = [(r["wall_time"], r["updates_per_s"][shard])
                      for r in timed if len(r["updates_per_s"]) > shard]
            updates_axis.plot([t for t, _ in points], [u for _, u in points],
                              label=f"{path.name} shard {shard}")
        for axis, key in ((pushes_axis, "pushes_per_worker"), (staleness_axis, "staleness_hist")):
            values = _last_list(records, key)
            positions = [i + (number - (len(runs) - 1) / 2) * width for i in range(len(values))]
            axis.bar(positions, values, width=width, label=path.name)
    workers = max((len(_last_list(records, "pushes_per_worker")) for _, records in runs), default=0)
    pushes_axis.set_xticks(range(workers))
    highest = [max((i for i, v in enumerate(_last_list(records, "staleness_hist")) if v), default=0)
               for _, records in runs]
    for axis, x_label, y_label in ((updates_axis, "wall time [s]", "server updates / s"),
                                   (pushes_axis, "worker", "pushes"),
                                   (staleness_axis, "staleness [updates between pull and push]", "pushes")):
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.grid(True, alpha=0.3)
    staleness_axis.set_xlim(-0.5, max(highest, default=0) + 0.5)
    staleness_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    updates_axis.legend(fontsize="x-small")
    pushes_axis.legend(fontsize="x-small")


def _all_positive(axis: Any) -> bool:
    values = [y for line in axis.get_lines() for y in line.get_ydata()]
    return bool(values) and min(values) > 0
