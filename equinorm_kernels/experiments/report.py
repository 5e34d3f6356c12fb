"""Summaries of the runs: median and inter-quartile range over seeds, the markdown report, the plots.

Percentiles use numpy's default linear interpolation (type 7 of Hyndman and Fan, 1996): for sorted
values x_0 <= ... <= x_{n-1}, the q-th percentile is read at position q/100 * (n - 1) and
interpolated linearly between the two neighbouring values. Diverged runs are left out of the
medians and counted separately.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .training import RunResult  # noqa: E402


@dataclass(frozen=True)
class Spread:
    """Median and inter-quartile range of some values."""

    median: float
    p25: float
    p75: float
    count: int

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """``median [p25, p75]`` with the values multiplied by ``scale``."""
        values = (self.median * scale, self.p25 * scale, self.p75 * scale)
        return "{:.{d}f} [{:.{d}f}, {:.{d}f}]".format(*values, d=digits)


def median_iqr(values: Sequence[float]) -> Spread:
    """Median, 25th and 75th percentiles (numpy's linear interpolation) of the finite ``values``.

    Raises:
        ValueError: no finite value.
    """
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        raise ValueError("median_iqr needs at least one finite value")
    p25, median, p75 = np.percentile(finite, [25, 50, 75])
    return Spread(float(median), float(p25), float(p75), int(finite.size))


@dataclass(frozen=True)
class Cell:
    """Final numbers of one (method, batch size) over its seeds; spreads are None when every run diverged."""

    accuracy: Spread | None
    loss: Spread | None
    wall_seconds: Spread | None
    diverged: int
    runs: int


def summarize(runs: Sequence[RunResult]) -> dict[tuple[str, int], Cell]:
    """One :class:`Cell` per (method, batch size) present in ``runs``."""
    cells: dict[tuple[str, int], Cell] = {}
    for key in dict.fromkeys((run.method, run.batch_size) for run in runs):
        group = [run for run in runs if (run.method, run.batch_size) == key]
        finished = [run for run in group if not run.diverged]
        cells[key] = Cell(
            accuracy=median_iqr([r.final_test_accuracy for r in finished]) if finished else None,
            loss=median_iqr([r.final_test_loss for r in finished]) if finished else None,
            wall_seconds=median_iqr([r.wall_seconds for r in group]),
            diverged=len(group) - len(finished),
            runs=len(group),
        )
    return cells


def markdown_table(
    cells: dict[tuple[str, int], Cell], methods: Sequence[str], batch_sizes: Sequence[int], entry: Callable[[Cell], str]
) -> str:
    """Rows are methods, columns batch sizes, each entry written by ``entry``."""
    lines = [
        "| method | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
        "|---|" + "---|" * len(batch_sizes),
    ]
    for method in methods:
        row = [entry(cells[(method, b)]) if (method, b) in cells else "-" for b in batch_sizes]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _spread_entry(spread: Spread | None, cell: Cell, **style: float) -> str:
    text = "diverged" if spread is None else spread.format(**style)
    return text + (f" ({cell.diverged}/{cell.runs} div.)" if cell.diverged else "")


def accuracy_entry(cell: Cell) -> str:
    return _spread_entry(cell.accuracy, cell, scale=100.0)


def loss_entry(cell: Cell) -> str:
    return _spread_entry(cell.loss, cell, digits=3)


def diverged_entry(cell: Cell) -> str:
    return f"{cell.diverged}/{cell.runs}"


def wall_entry(cell: Cell) -> str:
    return f"{cell.wall_seconds.median:.2f}" if cell.wall_seconds else "-"


def results_tables(runs: Sequence[RunResult], methods: Sequence[str], batch_sizes: Sequence[int]) -> str:
    """The accuracy, loss, divergence and timing tables, in markdown."""
    cells = summarize(runs)
    sections = [
        ("Final test accuracy (%), median [p25, p75] over seeds", accuracy_entry),
        ("Final test loss, median [p25, p75] over seeds", loss_entry),
        ("Diverged runs", diverged_entry),
        ("Wall time per run (s), median over seeds", wall_entry),
    ]
    tables = (f"### {title}\n\n{markdown_table(cells, methods, batch_sizes, entry)}" for title, entry in sections)
    return "\n\n".join(tables)


# --- plots ------------------------------------------------------------------------------------------

# RunResult curve -> (axis label, scale)
CURVE_METRICS = {
    "test_accuracy": ("test accuracy (%)", 100.0),
    "test_loss": ("test loss", 1.0),
    "train_loss": ("train loss", 1.0),
}


def plot_curves(
    runs: Sequence[RunResult], methods: Sequence[str], batch_sizes: Sequence[int], metric: str, path: Path
) -> None:
    """``metric`` per epoch: one panel per batch size, per method the median over seeds and the IQR band."""
    label, scale = CURVE_METRICS[metric]
    figure, axes = _panels(len(batch_sizes))
    for ax, batch_size in zip(axes, batch_sizes):
        for color, method in zip(_colors(len(methods)), methods):
            curves = [getattr(r, metric) for r in runs if r.method == method and r.batch_size == batch_size]
            if curves:
                _median_with_band(ax, np.asarray(curves, dtype=np.float64) * scale, method, color)
        ax.set_title(f"batch size {batch_size}", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(label)
    if metric != "test_accuracy" and any(_has_positive_data(ax) for ax in axes):
        for ax in axes:
            ax.set_yscale("log")  # losses span decades; log needs at least one finite value to place ticks
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle(f"{label}: median and inter-quartile range over seeds", fontsize="medium")
    _save(figure, path)


def _median_with_band(ax: plt.Axes, values: np.ndarray, method: str, color: object) -> None:
    """Median line and p25-p75 band of ``values`` (seeds, epochs), NaN after a divergence."""
    epochs = np.arange(1, values.shape[1] + 1)
    p25, median, p75 = _nan_percentiles(values)
    diverged = int(np.isnan(values).any(axis=1).sum())
    name = method + (f" ({diverged} div.)" if diverged else "")
    ax.plot(epochs, median, color=color, marker="o" if len(epochs) == 1 else None, label=name)
    ax.fill_between(epochs, p25, p75, color=color, alpha=0.2, linewidth=0)


def plot_energy_cycles(layer_names: Sequence[str], energies: Sequence[Sequence[float]], path: Path) -> None:
    """Per-layer energy of a fresh model before ENorm (cycle 0) and after each cycle, darker = later."""
    figure, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(layer_names) + 3), 4.8))
    colormap = plt.get_cmap("Blues")
    shades = Normalize(vmin=-0.3 * len(energies), vmax=len(energies) - 1)  # cycle 0 still visible
    positions = np.arange(len(layer_names))
    for cycle, energy in enumerate(energies):
        ax.plot(positions, energy, color=colormap(shades(cycle)), marker=".", linewidth=1.2)
    colorbar = figure.colorbar(ScalarMappable(shades, colormap), ax=ax, pad=0.02)
    colorbar.set_label("ENorm cycle (0 = initialisation)")
    colorbar.ax.set_ylim(0, len(energies) - 1)
    _layer_axis(ax, layer_names)
    ax.set_title(f"Untrained model through {len(energies) - 1} ENorm cycles", fontsize="medium")
    _save(figure, path)


# (method, RunResult attribute, label, colour) of the lines in the energy-after-training plot
ENERGY_LINES = (
    ("enorm", "energy_at_init", "initialisation", "0.55"),
    ("none", "energy_after_training", "trained without ENorm", "tab:orange"),
    ("enorm", "energy_after_training", "trained with ENorm", "tab:blue"),
)


def plot_energy_training(runs: Sequence[RunResult], batch_sizes: Sequence[int], path: Path) -> bool:
    """Per-layer energy at initialisation and after training, with ENorm ("enorm") and without ("none").

    One panel per batch size, medians over seeds. Returns False (and writes nothing) when no run of
    the "enorm" method finished.
    """
    tracked = [r for r in runs if r.method == "enorm" and r.energy_after_training is not None]
    if not tracked:
        return False
    layer_names = list(tracked[0].energy_at_init)
    positions = np.arange(len(layer_names))
    figure, axes = _panels(len(batch_sizes))
    for ax, batch_size in zip(axes, batch_sizes):
        for method, attribute, label, color in ENERGY_LINES:
            energies = [getattr(r, attribute) for r in runs if r.method == method and r.batch_size == batch_size]
            energies = [[e[name] for name in layer_names] for e in energies if e is not None]
            if energies:
                ax.plot(positions, np.median(np.asarray(energies), axis=0), color=color, marker=".", label=label)
        _layer_axis(ax, layer_names)
        ax.set_title(f"batch size {batch_size}", fontsize="medium")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle("Per-layer energy, median over seeds", fontsize="medium")
    _save(figure, path)
    return True


def _nan_percentiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """25th, 50th, 75th percentiles over axis 0, ignoring NaN; NaN where a column has no finite value."""
    out = np.full((3, values.shape[1]), np.nan)
    finite_columns = np.isfinite(values).any(axis=0)
    if finite_columns.any():
        out[:, finite_columns] = np.nanpercentile(values[:, finite_columns], [25, 50, 75], axis=0)
    return out[0], out[1], out[2]


def _has_positive_data(ax: plt.Axes) -> bool:
    return any(np.any(np.isfinite(y) & (y > 0)) for y in (np.asarray(line.get_ydata(), float) for line in ax.lines))


def _panels(count: int) -> tuple[plt.Figure, list[plt.Axes]]:
    figure, axes = plt.subplots(1, count, figsize=(4.5 * count + 1.5, 4.5), squeeze=False, sharey=True)
    return figure, list(axes[0])


def _colors(count: int) -> list:
    return [plt.get_cmap("tab10")(i % 10) for i in range(count)]


def _layer_axis(ax: plt.Axes, layer_names: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(layer_names)), layer_names, rotation=60, ha="right", fontsize="x-small")
    ax.set_yscale("log")
    ax.set_ylabel("energy sum |W|^2 + |b|^2")
    ax.grid(alpha=0.3)


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")  # keeps legends placed outside the axes
    plt.close(figure)
