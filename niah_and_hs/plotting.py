"""Shared figure helpers: saving (SVG for papers, PNG beside it for arXiv), short and wrapped labels for
attention-type names (up to ~90 characters, no spaces), and output names that never collide."""
from __future__ import annotations

import hashlib
import os
import re

# The paper's names for the attention types it discusses; any other type keeps its configs name.
TYPE_NAMES = {
    "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2": "2Mamba",
    "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2": "2Mamba-E",
    "softmax": "Softmax",
    "mamba": "Mamba-2",
    "linear": "Linear",
}


def type_name(attention_type: str) -> str:
    return TYPE_NAMES.get(attention_type, attention_type)


def wrap_label(text: str, width: int) -> str:
    """Lines of at most `width` characters, broken after spaces or the "__" between configs fields; a
    piece longer than `width` on its own is cut."""
    pieces = [p for p in re.split(r"(?<=__)|(?<= )", text) if p]
    lines, current = [], ""
    for piece in pieces:
        while len(piece) > width:
            if current:
                lines.append(current)
                current = ""
            lines.append(piece[:width])
            piece = piece[width:]
        if len(current) + len(piece) > width and current:
            lines.append(current)
            current = ""
        current += piece
    if current:
        lines.append(current)
    return "\n".join(line.rstrip() for line in lines)


def output_name(parts: list[str], limit: int = 80, sep: str = "+") -> str:
    """A file/folder name built from the inputs' names, so outputs of different inputs never overwrite
    each other; too long a name is cut and made unique by a hash of the whole."""
    name = re.sub(r"[^\w.+-]+", "-", sep.join(parts)).strip("-") or "output"
    if len(name) <= limit:
        return name
    return f"{name[:limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def save_svg_and_png(fig, out_base: str, dpi: int = 200) -> list[str]:
    """Write fig to out_base.svg and out_base.png (creating the folder), close it, return the paths."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(out_base)), exist_ok=True)
    paths = [f"{out_base}.svg", f"{out_base}.png"]
    for path in paths:
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return paths
