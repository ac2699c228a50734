"""PNG figures of a run summary: each target's metric against stored weight size, and heatmaps of the transfer grids.

Heatmap colours run from red (worse) to green (better): within each column for source × target grids (their
columns are different metrics), over the whole grid for trained-at × applied-at grids (one task); perplexities are
coloured on a log scale. Matplotlib renders through the Agg backend into memory; files are written atomically.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from cpt_bench.files import write_bytes_atomic  # noqa: E402
from cpt_bench.recovery import RECOVERY_KINDS  # noqa: E402
from cpt_bench.report.serving import BATCHES, LevelSaving, PromptCost, serving_plot_data  # noqa: E402
from cpt_bench.report.tables import (  # noqa: E402
    MISSING,
    Grid,
    Summary,
    format_number,
    is_perplexity,
    level_grids,
    prompt_label,
    source_target_grids,
)

_LINE_ORDER = {name: index for index, name in enumerate(RECOVERY_KINDS)}  # lines in the registry's order
_DPI = 100
_COLOURS = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd")


@dataclass(frozen=True)
class Plot:
    """A written PNG and its caption."""

    title: str
    path: Path


def safe_filename(stem: str) -> str:
    """``stem.png`` with every character but letters, digits, ``-``, ``_`` and ``.`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem) + ".png"


def write_plots(summary: Summary, out_dir: Path) -> list[Plot]:
    """One metric-vs-size plot per target, then one heatmap per source × target grid and per level grid, then the
    serving-cost plot when the cells recorded prompt caches."""
    plots = [_metric_plot(summary, target, out_dir) for target in summary.targets]
    plots += [_heatmap(grid, out_dir) for grid in (*source_target_grids(summary), *level_grids(summary))]
    savings, costs = serving_plot_data(summary)
    if savings and costs:
        plots.append(_serving_plot(savings, costs, out_dir))
    return plots


def _save(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    write_bytes_atomic(path, buffer.getvalue())


def metric_series(summary: Summary, target: dict[str, Any]) -> dict[str, list[tuple[float, float, float]]]:
    """Line label -> points (stored weight MB, value, stderr or nan) by increasing MB; none, hard, then soft lines."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    order: dict[str, int] = {}
    for prompt in summary.prompts:  # one line per prompt across every level it was applied at
        label = prompt_label(prompt, target)
        order[label] = _LINE_ORDER[prompt["kind"]]
        for compression in summary.compressions:
            cell = summary.cell(compression["spec"], prompt["id"], target["task"])
            if cell is not None:
                stderr = math.nan if cell.get("stderr") is None else cell["stderr"]
                series.setdefault(label, []).append((compression["weight_bytes"] / 1e6, cell["value"], stderr))
    ordered = sorted(series.items(), key=lambda item: order[item[0]])
    return {label: sorted(points) for label, points in ordered}


def _metric_plot(summary: Summary, target: dict[str, Any], out_dir: Path) -> Plot:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for label, points in metric_series(summary, target).items():
        sizes, values, errors = zip(*points, strict=True)
        axes.errorbar(sizes, values, yerr=errors, marker="o", capsize=3, label=label)
    if is_perplexity(target["metric"]):
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(LogFormatter())
        axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    better = "higher" if target["higher_is_better"] else "lower"
    axes.set(xlabel="stored weight MB", ylabel=f"{target['metric']} ({better} is better)", title=target["task"])
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path = out_dir / safe_filename(f"plot-{target['task']}")
    _save(figure, path)
    return Plot(f"{target['task']}: {target['metric']} against stored weight MB", path)


def _serving_plot(savings: list[LevelSaving], costs: list[PromptCost], out_dir: Path) -> Plot:
    """Bytes against concurrent sequences (log-log): each prompt's fp16 key/value cache rising with the batch, each
    level's stored bytes saved flat; where a prompt's line crosses a level's, its caches have used up the saving."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    sequences = np.unique(np.geomspace(1, 4096, 25).round())
    for cost in costs:
        axes.plot(sequences, sequences * cost.kv_bytes_per_sequence / 1e6, label=f"prompt KV: {cost.label}")
    for saving in savings:
        axes.axhline(saving.stored_saved / 1e6, linestyle="--", color="grey")
        axes.annotate(f"saved by {saving.spec}", (sequences[0], saving.stored_saved / 1e6), fontsize="small",
                      xytext=(2, 2), textcoords="offset points")
    for batch in BATCHES:
        axes.axvline(batch, color="lightgrey", linewidth=0.8)
    axes.set(xscale="log", yscale="log", xlabel="concurrent sequences served with the prompt",
             ylabel="MB (fp16)", title="Memory saved by compression vs the prompt's key/value cache")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path = out_dir / "serving-cost.png"
    _save(figure, path)
    return Plot("Memory saved by compression (stored weights) against the prompt's key/value cache", path)


def _colour_values(grid: Grid) -> list[list[float]]:
    """Cell values (log for perplexities), nan where absent."""
    def value(cell: dict[str, Any] | None, target: dict[str, Any]) -> float:
        if cell is None:
            return math.nan
        return math.log(cell["value"]) if is_perplexity(target["metric"]) and cell["value"] > 0 else cell["value"]

    return [[value(cell, target) for cell, target in zip(row, grid.targets, strict=True)] for row in grid.cells]


def colour_scores(grid: Grid) -> list[list[float]]:
    """Scores in [0, 1], 1 best, nan where absent: min-max scaled per column, or over the grid if one task."""
    values = _colour_values(grid)
    columns = [list(column) for column in zip(*values, strict=True)]
    if len({target["task"] for target in grid.targets}) == 1:
        columns = [[v for column in columns for v in column]] * len(columns)
    ranges = []
    for column in columns:
        finite = [v for v in column if not math.isnan(v)]
        ranges.append((min(finite), max(finite)) if finite else (0.0, 0.0))

    def score(v: float, bounds: tuple[float, float], target: dict[str, Any]) -> float:
        low, high = bounds
        scaled = 0.5 if high == low else (v - low) / (high - low)
        return scaled if target["higher_is_better"] else 1.0 - scaled

    return [[score(v, bounds, target) for v, bounds, target in zip(row, ranges, grid.targets, strict=True)]
            for row in values]


def _heatmap(grid: Grid, out_dir: Path) -> Plot:
    n_rows, n_columns = len(grid.row_labels), len(grid.column_labels)
    figure = Figure(figsize=(2.5 + 1.8 * n_columns, 1.8 + 0.5 * n_rows))
    axes = figure.subplots()
    axes.imshow(np.ma.masked_invalid(np.array(colour_scores(grid), dtype=float)), cmap=_COLOURS, vmin=0.0, vmax=1.0,
                aspect="auto")
    for i, row in enumerate(grid.cells):
        for j, (cell, target) in enumerate(zip(row, grid.targets, strict=True)):
            text = MISSING if cell is None else format_number(cell["value"], target["metric"])
            axes.text(j, i, text, ha="center", va="center", fontsize=9)
    axes.set_xticks(range(n_columns), labels=grid.column_labels, rotation=20, ha="right", fontsize=8)
    axes.set_yticks(range(n_rows), labels=grid.row_labels, fontsize=8)
    axes.set_ylabel(grid.corner)
    axes.set_title(textwrap.fill(grid.title, 70), fontsize=9)
    figure.tight_layout()
    path = out_dir / safe_filename(grid.key)
    _save(figure, path)
    return Plot(grid.title, path)
