"""Static sm_90 resources of the chunked form's feature kernels, on any machine (no GPU needed).

Each kernel is compiled for Hopper at the launch constants of kernel/power/features.py and the bench shape
(C = 256 tokens a chunk, d = dv = 64, bf16), with and without token weights; ptxas -v (shipped with Triton's
wheel) reports registers and spills, and nvdisasm's listing gives each loop's size and its local-memory loads
(spill reloads on every pass). A cheap check before timing a kernel change on the device.

    python bench/kernel_resources.py [--warps 4 8]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernel.power import features

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
C, D, E = 256, 64, 64
BF16, F32, I32 = "*bf16", "*fp32", "i32"


def kernels(warps):
    """name -> (kernel, {argument: type or constexpr value}, launch options); warps None: features.py's."""
    def launch(table):
        return dict(num_warps=warps or table["NUM_WARPS"], num_stages=table["NUM_STAGES"])

    out = {}
    for has_w in (False, True):
        w = " w" if has_w else ""
        out["outer" + w] = (features._outer_kernel, dict(
            A=BF16, B=BF16, W=F32, OUT=BF16, C=I32, E=I32, E_MAIN=I32, D=D, NF=I32, BLOCK_C=C, BLOCK_D=D, SPLIT=D // 2,
            BLOCK_MAIN=E, BLOCK_TAIL=0, BLOCK_I=features.OUTER["BLOCK_I"], ONE_BLOCK=True, HAS_W=has_w, IEEE=False),
            launch(features.OUTER))
        out["apply" + w] = (features._apply_kernel, dict(
            A=BF16, M=BF16, OUT=F32, W=F32, B=BF16, DW=F32, TILE0=I32, C=I32, E=I32, E0=I32, E1=I32, D=D, NF=I32,
            BLOCK_C=features.APPLY["BLOCK_C"], BLOCK_D=D, SPLIT=D // 2, LOW=D // 2, BLOCK_E=E, HAS_W=has_w,
            IEEE=False), launch(features.APPLY))
        out["grad" + w] = (features._grad_kernel, dict(
            A=BF16, M=BF16, DY=BF16, W=F32, ADD=BF16, DA=BF16, C=I32, E=I32, E_MAIN=I32, D=D, NF=I32,
            BLOCK_C=features.GRAD["BLOCK_C"], BLOCK_D=D, BLOCK_MAIN=E, BLOCK_TAIL=0, HAS_W=has_w, HAS_ADD=has_w,
            IEEE=False), launch(features.GRAD))
    return out


def resources(fn, args, options):
    """(registers, spill bytes stored, shared bytes, [(loop lines, spill reloads per pass)])."""
    signature = {k: v if isinstance(v, str) else "constexpr" for k, v in args.items()}
    constants = {k: v for k, v in args.items() if not isinstance(v, str)}
    pointers = [i for i, v in enumerate(args.values()) if isinstance(v, str) and v.startswith("*")]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants,
                                        attrs={(i,): [["tt.divisibility", 16]] for i in pointers}),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        info = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
        listing = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                                 check=True).stdout.splitlines()
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", info).group(1))
    labels = {m.group(1): i for i, line in enumerate(listing) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(listing):  # a branch back to an earlier label closes a loop
        m = re.search(r"BRA\W+(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i - 1:
            body = listing[labels[m.group(1)]:i]
            loops.append((len(body), sum("LDL" in b for b in body)))
    return registers, spilled, compiled.metadata.shared, loops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warps", type=int, nargs="*", default=[None],
                        help="warps per program to compile at (default: each kernel's own from features.py)")
    args = parser.parse_args()
    print(f"sm_90, C={C}, d={D}, dv={E}, bf16; loops: instructions per pass (spill reloads per pass)")
    for warps in args.warps:
        for name, (fn, kernel_args, options) in kernels(warps).items():
            registers, spilled, shared, loops = resources(fn, kernel_args, options)
            body = ", ".join(f"{n} ({ldl})" for n, ldl in loops)
            print(f"{name:8} warps {options['num_warps']}: {registers} registers, {spilled} bytes spilled, "
                  f"{shared} bytes shared; loops {body}")


if __name__ == "__main__":
    main()
