"""Shared output step of the NIAH and memory figures: SVG for papers, PNG beside it for arXiv."""
from __future__ import annotations

import os


def save_svg_and_png(fig, out_base: str, dpi: int = 200) -> list[str]:
    """Write fig to out_base.svg and out_base.png (creating the folder), close it, return the paths."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(out_base)), exist_ok=True)
    paths = [f"{out_base}.svg", f"{out_base}.png"]
    for path in paths:
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return paths
