"""Static sm_90 resources of the chunked form's feature kernels, on any machine (no GPU needed).

The launchers of kernel/power/features.py are called at the bench shape (one chunk of C = 256 tokens,
d = dv = 64, bf16), with and without token weights, with their kernel launches captured instead of run; each
captured launch is compiled for Hopper as the GPU's launcher would specialise it (pointers and integers
divisible by 16 marked so; integers equal to 1, which the launcher makes constants, are left as they are: the
one head of these launches stands for the model's 16). ptxas -v (shipped with Triton's wheel) reports
registers and spills, and nvdisasm's listing gives each loop's size and its local-memory loads (spill reloads on
every pass). From Triton's own IR (TTGIR) and PTX, what the source does not show: tiles read from shared memory
into registers inside a loop (`local_load`: an operand the source holds fixed that Triton keeps in shared memory
and reloads every pass, or a pipelined load consumed in registers), tensor-core products inside loops whose first
operand comes from shared memory rather than registers, loads inside loops that feed a product's first operand
in the same pass (not prefetched: each pass waits for its load), and `mma.sync` products (too short for Hopper's
64-row warp-group product). A cheap check before timing a kernel change on the device (bench/NOTES.md, sessions
29 and 30).

    python bench/kernel_resources.py [--warps 4 8]
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from kernel.power import features

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
C, D, E = 256, 64, 64
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def launches():
    """name -> (kernel, {argument: value}, launch options) of each product as its launcher calls it."""
    def tensor(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype)

    a, b, dy, add = tensor(1, C, D), tensor(1, C, E), tensor(1, C, E), tensor(1, C, D)
    m, w = tensor(1, D * (D + 1) // 2, E), tensor(1, C, dtype=torch.float32)
    # as the chunked form calls them (kernel/power/chunk.py): the gradients with their other terms added
    calls = {"outer": lambda: features.outer(a, b), "apply": lambda: features.apply(a, m, torch.float32),
             "grad": lambda: features.grad(a, m, dy, adds=(add, add)), "outer w": lambda: features.outer(a, b, w),
             "apply w": lambda: features.apply(a, m, b.dtype, w, b, add=dy),
             "grad w": lambda: features.grad(a, m, dy, w, adds=(add, add))}
    out = {}
    for name, call in calls.items():
        captured = []
        with mock.patch.object(JITFunction, "run", lambda self, *args, grid, warmup, **kw: captured.append(
                (self, args, kw))):
            call()
        fn, args, kwargs = captured[0]
        params = list(inspect.signature(fn.fn).parameters)
        values = dict(zip(params, args), **{k: v for k, v in kwargs.items() if k in params})
        out[name] = (fn, values, {k: kwargs[k] for k in ("num_warps", "num_stages")})
    return out


def resources(fn, values, options):
    """(registers, spill bytes stored, shared bytes, [(loop lines, spill reloads per pass)]) of one launch,
    specialised as the GPU's launcher does: pointers and integers divisible by 16 marked so."""
    constexprs = {name for name, p in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(p.annotation)}
    signature = {k: "constexpr" if k in constexprs else POINTER_TYPES[v.dtype] if torch.is_tensor(v) else "i32"
                 for k, v in values.items()}
    aligned = [i for i, (k, v) in enumerate(values.items()) if k not in constexprs
               and (v.data_ptr() % 16 == 0 if torch.is_tensor(v) else v % 16 == 0)]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs={k: values[k] for k in constexprs},
                                        attrs={(i,): [["tt.divisibility", 16]] for i in aligned}),
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
    operands = loop_operands(compiled.asm["ttgir"]) + (compiled.asm["ptx"].count("mma.sync"),)
    labels = {m.group(1): i for i, line in enumerate(listing) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(listing):  # a branch back to an earlier label closes a loop
        m = re.search(r"BRA\W+(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i - 1:
            body = listing[labels[m.group(1)]:i]
            loops.append((len(body), sum("LDL" in b for b in body)))
    return registers, spilled, compiled.metadata.shared, loops, operands


def loop_operands(ttgir):
    """(shared-memory tiles loaded into registers inside loops, products inside loops whose first operand is
    read from shared memory, loads inside loops whose value reaches the first operand of a product in the same
    pass) in a kernel's TTGIR, counted by walking its blocks: a line that opens one more brace than it closes
    starts a block (a loop when it holds `scf.for`), one that closes one more ends it. The third follows each
    load's SSA value through the ops of its loop: Triton's pipeline prefetches only the products' operands
    that it stages in shared memory, so a load that feeds a register operand waits in every pass."""
    blocks, reloads, shared_a, exposed = [], 0, 0, 0
    loaded = set()  # SSA values of the current loop that carry a load of this pass
    for line in ttgir.splitlines():
        depth = line.count("{") - line.count("}")
        in_loop = "for" in blocks
        if in_loop and "ttg.local_load" in line:
            reloads += 1
        if in_loop and "ttng.warp_group_dot " in line and line.split("} : ", 1)[-1].startswith("!ttg.memdesc"):
            shared_a += 1
        if in_loop and " = " in line:
            defined, op = line.split(" = ", 1)
            operands = [x.split("#")[0] for x in re.findall(r"%[\w#]+", op.split(" loc(")[0])]  # %x#0: result 0 of %x
            if op.startswith("tt.load ") or any(x in loaded for x in operands if not op.startswith("scf.")):
                loaded.update(name.split(":")[0] for name in re.findall(r"%[\w:]+", defined))
            if op.startswith("ttng.warp_group_dot ") and operands and operands[0] in loaded:
                exposed += 1
        if depth > 0:
            if "scf.for" in line and not in_loop:
                loaded = set()
            blocks.append("for" if "scf.for" in line else "block")
        elif depth < 0 and blocks:
            blocks.pop()
    return reloads, shared_a, exposed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warps", type=int, nargs="*", default=[None],
                        help="warps per program to compile at (default: each kernel's own from features.py)")
    args = parser.parse_args()
    if any(w is not None and w not in (1, 2, 4, 8, 16) for w in args.warps):
        parser.error(f"--warps takes powers of two from 1 to 16, got {args.warps}")
    print(f"sm_90, C={C}, d={D}, dv={E}, bf16; loops: instructions per pass (spill reloads per pass)")
    table = launches()
    for warps in args.warps:
        for name, (fn, values, options) in table.items():
            options = dict(options, num_warps=warps or options["num_warps"])
            registers, spilled, shared, loops, (reloads, shared_a, exposed, mma_sync) = resources(fn, values, options)
            body = ", ".join(f"{n} ({ldl})" for n, ldl in loops)
            print(f"{name:8} warps {options['num_warps']}: {registers} registers, {spilled} bytes spilled, "
                  f"{shared} bytes shared; loops {body}; in loops: {reloads} shared-memory reloads, {shared_a} "
                  f"products reading shared memory, {exposed} loads feeding a product; {mma_sync} mma.sync")


if __name__ == "__main__":
    main()
