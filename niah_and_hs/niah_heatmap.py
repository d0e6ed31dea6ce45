"""Needle-in-a-haystack heatmap: one row per model, one column per context length.

    python niah_and_hs/niah_heatmap.py                  # the paper's Figure 8 -> niah_and_hs/results/niah_heatmap_paper
    python niah_and_hs/niah_heatmap.py a.json b.json    # niah.py results -> niah_and_hs/results/niah_heatmap_a+b
    python niah_and_hs/niah_heatmap.py a.json b.json --labels Softmax 2Mamba --out figures/niah

Inputs are results JSON files of niah.py (the procedure: docs/math.md#niah). Columns are the union of their
context lengths (in characters, as the dataset defines them), each with the mean prompt length in tokens
when known. Rows are labelled with the paper's name of the attention type (2Mamba, Softmax, ...) or, for
other types, a letter explained in a key under the plot. Writes OUT.svg and OUT.png; without --out the name
comes from the inputs, so no run overwrites the figure of other inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import string
import sys

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend state

from GPT_Trainer.cli import UserError, run
from niah_and_hs.plotting import output_name, save_svg_and_png, type_name, wrap_label

# Figure 8 of the paper: accuracy per dataset context_length (characters); ~ tokens from the paper's axis.
PAPER_LENGTHS = [1024, 2048, 4096, 8192, 16384]
PAPER_TOKENS = [355, 631, 1182, 2286, 4497]
PAPER_ROWS = {
    "Mamba-2": [0.94, 0.45, 0.15, 0.027, 0.025],
    "Softmax": [1.0, 1.0, 1.0, 0.94, 0.38],
    "2Mamba": [1.0, 1.0, 1.0, 1.0, 0.95],
}
RESULTS_DIR = os.path.join("niah_and_hs", "results")
MAX_ROW_LABEL = 16  # longer row labels become a letter + a key line, so the heatmap keeps its width
KEY_WIDTH = 100  # characters per line of the key under the plot


def column_label(length: int, tokens: float | None) -> str:
    return f"{length}\n(≈{round(tokens)} tokens)" if tokens is not None else str(length)


def paper_table():
    """(row labels, column labels, accuracies [rows, cols]) of the paper's figure."""
    columns = [column_label(n, t) for n, t in zip(PAPER_LENGTHS, PAPER_TOKENS)]
    return list(PAPER_ROWS), columns, np.array(list(PAPER_ROWS.values()))


def read_result(file) -> dict:
    try:
        with open(file) as f:
            result = json.load(f)
        for entry in result["per_length"]:  # checked and converted once here
            entry["accuracy"], entry["context_length"] = float(entry["accuracy"]), int(entry["context_length"])
        return result
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{file}:{e.lineno}: not JSON ({e.msg})") from e
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{file}: not a niah.py results file (needs per_length entries with context_length "
                        f"and accuracy; {type(e).__name__}: {e})") from e


def table_from_results(files, labels=None):
    """Rows from niah.py JSON files; a length a model was not tested at is NaN (blank cell). Default row
    labels: the attention type's short name, with the run folder added where two rows would share one."""
    results = [read_result(file) for file in files]
    if labels is not None and len(labels) != len(files):
        raise UserError(f"{len(labels)} labels given for {len(files)} result files")
    if labels is None:
        labels = [type_name(r.get("attention_type") or os.path.basename(str(r.get("model_path", "")))) for r in results]
        labels = [f"{label} ({os.path.basename(str(r.get('model_path', file)).rstrip('/'))})"
                  if labels.count(label) > 1 else label for label, r, file in zip(labels, results, files)]
    lengths = sorted({e["context_length"] for r in results for e in r["per_length"]})
    if not lengths:
        raise UserError(f"{', '.join(map(str, files))}: no accuracy to plot (empty per_length)")
    tokens = {}
    for r in results:
        for e in r["per_length"]:
            if e.get("mean_prompt_tokens") is not None:
                tokens.setdefault(e["context_length"], []).append(e["mean_prompt_tokens"])
    columns = [column_label(n, np.mean(tokens[n]) if n in tokens else None) for n in lengths]
    values = np.full((len(results), len(lengths)), np.nan)
    for i, r in enumerate(results):
        for e in r["per_length"]:
            values[i, lengths.index(e["context_length"])] = e["accuracy"]
    return labels, columns, values


def short_labels(labels):
    """(tick labels, key lines): a label longer than MAX_ROW_LABEL is shown as a letter and spelt out in
    the key."""
    letters = iter(c for c in string.ascii_uppercase + string.ascii_lowercase if c not in labels)
    ticks, key = [], []
    for label in labels:
        if len(label) <= MAX_ROW_LABEL:
            ticks.append(label)
        else:
            ticks.append(next(letters, "?"))
            key.append(f"{ticks[-1]}: {label}")
    return ticks, key


def heatmap_figure(labels, columns, values, title="Needle in a haystack benchmark") -> Figure:
    """The heatmap as a matplotlib Figure, sized from its content: every column wide enough for its tick
    label, every label inside the canvas (constrained layout)."""
    ticks, key = short_labels(labels)
    key_text = "\n".join(wrap_label(line, KEY_WIDTH) for line in key)
    widest_tick = max(len(line) for c in columns for line in c.split("\n"))
    column_in = max(0.9, 0.1 * widest_tick + 0.3)  # ~0.1 in per character at 10 pt
    label_in = 0.1 * max(len(t) for t in ticks)
    width = max(5.0, column_in * len(columns) + label_in + 2.4, 0.075 * min(KEY_WIDTH, max(map(len, key), default=0)))
    key_in = 0.18 * (key_text.count("\n") + 1) if key else 0.0
    height = 0.6 * len(ticks) + 2.0 + key_in
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, j in zip(*np.nonzero(~np.isnan(values))):
        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=11)
    ax.set_xticks(range(len(columns)), columns, fontsize=10)
    ax.set_yticks(range(len(ticks)), ticks, fontsize=10)
    ax.set_xlabel("Context length (characters; ≈ mean prompt tokens)")
    ax.set_ylabel("Model type")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="proportion correct")
    if key:
        fig.get_layout_engine().set(h_pad=0.1)
        fig.supxlabel(key_text, fontsize=9, ha="left", x=0.01, family="monospace")
    return fig


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="niah.py results JSON files (none: the paper's values)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="row labels, one per file (default: the attention type's short name)")
    parser.add_argument("--out", default=None,
                        help=f"output path without extension. Default: {RESULTS_DIR}/niah_heatmap_paper for the "
                             f"paper's values, {RESULTS_DIR}/niah_heatmap_<result file names> for results")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.results:
        table = table_from_results(args.results, args.labels)
        stems = [os.path.splitext(os.path.basename(f))[0] for f in args.results]
        default_out = os.path.join(RESULTS_DIR, output_name(["niah_heatmap_" + stems[0], *stems[1:]]))
    else:
        if args.labels:
            raise UserError("--labels needs results files (the paper's figure has its own labels)")
        table, default_out = paper_table(), os.path.join(RESULTS_DIR, "niah_heatmap_paper")
    out = args.out or default_out
    if os.path.splitext(out)[1].lower() in (".png", ".svg"):  # both are written; the stem names them
        out = os.path.splitext(out)[0]
    for path in save_svg_and_png(heatmap_figure(*table), out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
