"""The paper's Figure 7 from measured sizes: per-head memory of the decoding state vs sequence length.

Three attention blocks (head dim d = 64, float32) decode a random sequence token by token, each with its
own cache (GPT_Trainer/cache.py); at each measured length the bytes of the cache (numel * element_size;
of a KV cache its filled slots) are divided by the number of heads and compared with the closed forms
of docs/inference.md (in numbers of float32 values):
  softmax KV cache   2 N d
  2Mamba state       d D + D + 3d      (S, z, one pre-conv row of q, k, v; D = d(d+1)/2)
  linear state       d^2 + d + 3d      (power 1, sm_norm, same conv and decay)
2Mamba's state is the smaller once N > (d+1)^2/4 + 3/2 (1057.75 for d = 64).

    python niah_and_hs/hidden_state_memory.py --max_len 4096 --out niah_and_hs/results/hidden_state_memory
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import torch  # noqa: E402

from GPT_Trainer.cache import TwoMambaCache  # noqa: E402
from GPT_Trainer.LlamaDecoderLayerClean import (  # noqa: E402
    TWO_MAMBA, AttentionConfig, GenericAttention, SoftmaxAttention, attention_config,
)
from niah_and_hs.plotting import save_svg_and_png  # noqa: E402

LINEAR = AttentionConfig(power="1", norm_type="sm_norm", use_in_conv=True, in_conv_dim=2, A_mask_type="neg_softplus")
LABELS = ("Softmax (KV cache)", "2Mamba", "Linear")


def formula_values(label: str, n: int, d: int) -> int:
    """Float32 values per head held after n tokens (docs/inference.md)."""
    features = d * (d + 1) // 2
    return {"Softmax (KV cache)": 2 * n * d, "2Mamba": d * features + features + 3 * d, "Linear": d * d + d + 3 * d}[label]


def crossover_length(d: int) -> float:
    """N at which the KV cache (2 N d) equals 2Mamba's state (d D + D + 3d)."""
    return (d + 1) ** 2 / 4 + 3 / 2


def attention_layers(d: int, heads: int) -> dict:
    hidden = d * heads
    return {
        "Softmax (KV cache)": SoftmaxAttention(hidden, heads),
        "2Mamba": GenericAttention(hidden, heads, attention_config(TWO_MAMBA)),
        "Linear": GenericAttention(hidden, heads, LINEAR),
    }


@torch.no_grad()
def measure(lengths, d: int = 64, heads: int = 2, seed: int = 0) -> dict[str, list[int]]:
    """Bytes per head held by each layer's decoding state after each of `lengths` tokens (float32)."""
    lengths = sorted(lengths)
    if lengths[0] < 1:
        raise ValueError("lengths must be >= 1")
    torch.manual_seed(seed)
    tokens = torch.randn(1, lengths[-1], d * heads)
    measured = {}
    for label, attn in attention_layers(d, heads).items():
        attn.eval()
        cache = TwoMambaCache(num_layers=1)
        attn(tokens[:, :1], cache)
        sizes, n = [], 1
        for target in lengths:
            for t in range(n, target):
                attn(tokens[:, t:t + 1], cache)
            n = target
            sizes.append(cache.nbytes() // heads)
        measured[label] = sizes
    return measured


def plot(lengths, measured, d: int, out_base: str):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"Softmax (KV cache)": "tab:blue", "2Mamba": "tab:red", "Linear": "tab:green"}
    for label in LABELS:
        ax.plot(lengths, [4 * formula_values(label, n, d) / 1e6 for n in lengths], color=colors[label], label=label)
        ax.plot(lengths, [b / 1e6 for b in measured[label]], "o", color=colors[label], markersize=3)
    cross = crossover_length(d)
    ax.axvline(cross, color="gray", linestyle="--", label=f"N = (d+1)²/4 + 3/2 ≈ {cross:.0f}")
    ax.set_xlabel("Sequence length (tokens)")
    ax.set_ylabel("Memory per head (MB, float32)")
    ax.set_title(f"Hidden state memory per head (d = {d}); dots measured, lines closed form")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_svg_and_png(fig, out_base)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_len", type=int, default=4096)
    parser.add_argument("--points", type=int, default=32, help="measured lengths, evenly spaced")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--out", default=os.path.join("niah_and_hs", "results", "hidden_state_memory"),
                        help="output path without extension (.svg, .png and .json are written)")
    args = parser.parse_args(argv)
    lengths = sorted({max(1, round(args.max_len * (i + 1) / args.points)) for i in range(args.points)})
    measured = measure(lengths, args.head_dim)
    mismatched = [(label, n) for label in LABELS for n, b in zip(lengths, measured[label])
                  if b != 4 * formula_values(label, n, args.head_dim)]
    print(f"{'N':>6} " + " ".join(f"{label + ' MB':>22}" for label in LABELS))
    for i, n in enumerate(lengths):
        print(f"{n:>6} " + " ".join(f"{measured[label][i] / 1e6:>22.4f}" for label in LABELS))
    print(f"crossover N = {crossover_length(args.head_dim):.2f}; measured == closed form: {not mismatched}")
    paths = plot(lengths, measured, args.head_dim, args.out)
    with open(f"{args.out}.json", "w") as f:
        json.dump({"head_dim": args.head_dim, "lengths": lengths, "bytes_per_head": measured,
                   "crossover": crossover_length(args.head_dim), "mismatched": mismatched}, f, indent=1)
    for path in [*paths, f"{args.out}.json"]:
        print(f"wrote {path}")
    if mismatched:
        raise SystemExit(f"measured sizes differ from the closed forms at {mismatched}")


if __name__ == "__main__":
    main()
