"""Drawing: one line plot function (SVG + PNG) and the booktabs LaTeX table."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global backend state, nothing to close
from matplotlib.ticker import FuncFormatter

from niah_and_hs.plotting import wrap_label

PNG_DPI = 150


@dataclass
class Line:
    label: str
    color: str | None  # None: matplotlib's colour cycle
    steps: np.ndarray
    values: np.ndarray


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the window-1 before it (fewer at the start), so the curve keeps its length.
    Non-finite values (a diverged step) are left out rather than blanking every later window."""
    if window <= 1:
        return values
    finite = np.isfinite(values)
    sums = np.concatenate(([0.0], np.cumsum(np.where(finite, values, 0.0))))
    counts = np.concatenate(([0], np.cumsum(finite)))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):  # a window of only non-finite values stays NaN
        return (sums[ends] - sums[starts]) / (counts[ends] - counts[starts])


# A line with this few points is drawn with markers too: one test point must still be visible.
MARKER_MAX_POINTS = 30
LEGEND_WIDTH = 30  # characters per legend line; attention-type names run to ~90
LEGEND_ROWS = 20  # text lines per legend column that fit beside a 6 in high plot at 11 pt
LINESTYLES = ("-", "--", ":", "-.")


def line_styles(lines: Sequence[Line]) -> list[tuple]:
    """(colour, linestyle) per line. Lines without a colour take matplotlib's 10-colour cycle, or, when
    there are more of them, tab20 and then a new dash pattern per 20 lines, so no two look alike."""
    uncoloured = sum(line.color is None for line in lines)
    palette = colormaps["tab20"].colors if uncoloured > 10 else [None] * 10
    styles, auto = [], 0
    for line in lines:
        if line.color is not None:
            styles.append((line.color, "-"))
        else:
            styles.append((palette[auto % len(palette)], LINESTYLES[auto // len(palette) % len(LINESTYLES)]))
            auto += 1
    return styles


def line_figure(lines: Sequence[Line], title: str, xlabel: str | None, ylabel: str | None,
                smooth: int = 1) -> Figure:
    """One line per run against step, the legend outside the axes on the right (never over the data), in
    as many columns as its entries need; the figure widens with them so the plot keeps its size."""
    labels = [wrap_label(line.label, LEGEND_WIDTH) for line in lines]
    columns = max(1, -(-sum(label.count("\n") + 1 for label in labels) // LEGEND_ROWS))
    # 12x6 in is the paper's 1200x600 layout; each further legend column adds its width. Horizontal grid only.
    fig = Figure(figsize=(12 + 3.2 * (columns - 1), 6), layout="constrained")
    ax = fig.add_subplot()
    for line, label, (color, linestyle) in zip(lines, labels, line_styles(lines)):
        few = len(line.steps) <= MARKER_MAX_POINTS
        ax.plot(line.steps, trailing_mean(line.values, smooth), color=color, linestyle=linestyle, label=label,
                linewidth=1.2, marker="o" if few else None, markersize=5)
    ax.set_title(title, fontsize=18)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=14)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=14)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}"))
    ax.grid(axis="y", color="#e5e8ef")
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=11, frameon=False, ncols=columns)
    return fig


def plot_lines(lines: Sequence[Line], svg_path: Path, title: str, xlabel: str | None, ylabel: str | None,
               smooth: int = 1) -> list[Path]:
    """line_figure written to svg_path and a PNG beside it; returns both paths."""
    fig = line_figure(lines, title, xlabel, ylabel, smooth)
    svg_path.parent.mkdir(parents=True, exist_ok=True)
    png_path = svg_path.with_suffix(".png")
    fig.savefig(svg_path)
    fig.savefig(png_path, dpi=PNG_DPI)
    return [svg_path, png_path]


def train_table_value(values: np.ndarray, n: int, seed_indexing: bool = False) -> float:
    """Mean of the last n logged values; with seed_indexing, the seed's values[-n] (the single value n
    entries from the end, which the paper's printed train losses used)."""
    if seed_indexing:
        return float(values[-min(n, len(values))])
    return float(np.mean(values[-n:]))


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex_table(rows: Sequence[tuple[str, float | None, float | None]], header: Sequence[str], caption: str,
                label: str, num_decimals: int, bold_best: bool) -> str:
    """rows: (model, train value, test value), None where a run has no value (shown as --). With bold_best,
    every cell equal to its column's lowest value as printed is bold (ties are all bold)."""
    cells = [[None if v is None else f"{v:.{num_decimals}f}" for v in row[1:]] for row in rows]
    best = []
    for column in zip(*cells):
        printed = [float(c) for c in column if c is not None and np.isfinite(float(c))]
        best.append(min(printed) if bold_best and printed else None)
    lines = [r"\begin{table}[htbp]", r"\centering", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
             r"\toprule", " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for (model, *_), row_cells in zip(rows, cells):
        shown = []
        for cell, column_best in zip(row_cells, best):
            if cell is None:
                shown.append("--")
            elif column_best is not None and float(cell) == column_best:
                shown.append(rf"\textbf{{{cell}}}")
            else:
                shown.append(cell)
        lines.append(" & ".join([latex_escape(model), *shown]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption)}}}",
              rf"\label{{{label}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"
