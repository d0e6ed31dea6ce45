"""Needle-in-a-haystack heatmap: one row per model, one column per context length.

    python niah_and_hs/niah_heatmap.py                         # the paper's Figure 8 (values of SPEC section 8)
    python niah_and_hs/niah_heatmap.py a.json b.json --labels Softmax 2Mamba --out niah_and_hs/results/heatmap

Inputs are results JSON files of niah.py; columns are the union of their context lengths, labelled with the
mean prompt length in tokens when known. Writes OUT.svg and OUT.png.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
from niah_and_hs.plotting import save_svg_and_png  # noqa: E402

# Figure 8 of the paper: accuracy per dataset context_length (characters); ~ tokens from the paper's axis.
PAPER_LENGTHS = [1024, 2048, 4096, 8192, 16384]
PAPER_TOKENS = [355, 631, 1182, 2286, 4497]
PAPER_ROWS = {
    "Mamba-2": [0.94, 0.45, 0.15, 0.027, 0.025],
    "Softmax": [1.0, 1.0, 1.0, 0.94, 0.38],
    "2Mamba": [1.0, 1.0, 1.0, 1.0, 0.95],
}


def paper_table():
    """(row labels, column labels, accuracies [rows, cols]) of the paper's figure."""
    columns = [f"{n}\n(≈{t} tokens)" for n, t in zip(PAPER_LENGTHS, PAPER_TOKENS)]
    return list(PAPER_ROWS), columns, np.array(list(PAPER_ROWS.values()))


def table_from_results(files, labels=None):
    """Rows from niah.py JSON files; a length a model was not tested at is NaN (blank cell)."""
    results = []
    for file in files:
        with open(file) as f:
            results.append(json.load(f))
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels given for {len(files)} result files")
    labels = labels or [r.get("attention_type") or os.path.basename(r["model_path"]) for r in results]
    lengths = sorted({e["context_length"] for r in results for e in r["per_length"]})
    tokens = {}
    for r in results:
        for e in r["per_length"]:
            if e.get("mean_prompt_tokens") is not None:
                tokens.setdefault(e["context_length"], []).append(e["mean_prompt_tokens"])
    columns = [f"{n}\n(≈{round(np.mean(tokens[n]))} tokens)" if n in tokens else str(n) for n in lengths]
    values = np.full((len(results), len(lengths)), np.nan)
    for i, r in enumerate(results):
        for e in r["per_length"]:
            values[i, lengths.index(e["context_length"])] = e["accuracy"]
    return labels, columns, values


def plot_heatmap(labels, columns, values, out_base, title="Needle in a haystack benchmark"):
    """Write out_base.svg and out_base.png; returns both paths."""
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 2.5, 0.7 * len(labels) + 2.2))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=11)
    ax.set_xticks(range(len(columns)), columns, fontsize=9)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Model type")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="proportion correct")
    fig.tight_layout()
    return save_svg_and_png(fig, out_base)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="niah.py results JSON files (none: the paper's values)")
    parser.add_argument("--labels", nargs="+", default=None, help="row labels, one per file (default: attention type)")
    parser.add_argument("--out", default=os.path.join("niah_and_hs", "results", "niah_heatmap"),
                        help="output path without extension")
    args = parser.parse_args(argv)
    table = table_from_results(args.results, args.labels) if args.results else paper_table()
    for path in plot_heatmap(*table, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
