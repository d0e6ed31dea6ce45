"""Every Triton kernel the public ops launch also compiles for the GPU (sm_90, Hopper), on a CPU-only machine.

The interpreter runs kernels as Python, so it accepts programs the compiler rejects (a variable assigned
under a runtime `if` and read after it once cost a device call; bench/NOTES.md). Here the ops run on small
CPU inputs in a subprocess under the interpreter, which records the arguments of every kernel launch; a
second subprocess, without the interpreter, compiles each distinct specialisation for sm_90 (Triton's wheel
ships ptxas; no GPU is needed). The interpreter has no bfloat16: float16 runs take the tensor-core products
that bf16 takes on a GPU.

    python tests/test_compile.py record FILE    # the launches of ops_to_record(), pickled
    python tests/test_compile.py compile FILE   # compile each; prints one line per kernel
    python tests/test_compile.py gluon JOB      # one Gluon kernel of kernel/power/hopper.py (a JSON job)
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POINTER_TYPES = {"torch.float32": "*fp32", "torch.float16": "*fp16", "torch.bfloat16": "*bf16",
                 "torch.float64": "*fp64", "torch.int32": "*i32", "torch.int64": "*i64", "torch.bool": "*i1",
                 "torch.int8": "*i8", "torch.uint8": "*u8"}
OPTIONS = ("num_warps", "num_stages", "num_ctas")


def ops_to_record():
    """Small calls of every public op with a Triton path, forward and backward where it has one."""
    import torch

    from kernel import (attention, causal_conv1d, causal_conv1d_step, kron, linear, linears, neg_softplus,
                        power_attention, rms_norm, swiglu)
    from kernel.power import zero_state

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    B, H, N, d = 1, 2, 40, 16
    # float32 takes the kernels' exact (IEEE) products, float16 the tensor-core ones that bf16 takes on a GPU
    for power, normalize, dtype in itertools.product(("1", "2", "exp"), (True, False), (torch.float32, torch.float16)):
        q, k, v = (rand(B, H, N, d, dtype=dtype).requires_grad_() for _ in range(3))
        g = (-rand(B, H, N).abs()).requires_grad_()
        attention(q, k, v, g, power=power, normalize=normalize, backend="triton").sum().backward()
        attention(q, k, v, None, power=power, normalize=normalize, backend="triton").sum().backward()
    for power, normalize, dtype in itertools.product(("1", "2"), (True, False), (torch.float32, torch.float16)):
        q, k, v = (rand(B, H, N, d, dtype=dtype).requires_grad_() for _ in range(3))
        g = (-rand(B, H, N).abs()).requires_grad_()
        o, state = power_attention(q, k, v, g, power=power, normalize=normalize, algorithm="chunk", chunk_size=16,
                                   output_final_state=True, backend="triton")
        (o.sum() + state.sum()).backward()
        with torch.no_grad():
            s = zero_state(B, H, state.shape[2], d, "cpu").copy_(state)
            power_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], g[:, :, :1], power=power, normalize=normalize,
                            initial_state=s, output_final_state=True, inplace=True, backend="triton")
    # a conv's output, features strided: the kernels read it through pointers instead of tensor descriptors
    qkv = rand(B, 3 * H * d, N, dtype=torch.float16).transpose(1, 2).requires_grad_()
    views = [t.unflatten(-1, (H, d)) for t in qkv.chunk(3, dim=-1)]
    g = (-rand(B, N, H).abs()).requires_grad_()
    attention(*views, g, power="exp", backend="triton", layout="bnhd").square().sum().backward()
    # the real head width: apply's half-width steps (m >= d / 2) exist from d = 17 on (32-wide blocks)
    q, k, v = (rand(B, H, N, 64, dtype=torch.float16).requires_grad_() for _ in range(3))
    o, state = power_attention(q, k, v, None, algorithm="chunk", chunk_size=16, output_final_state=True,
                               backend="triton")
    (o.sum() + state.sum()).backward()
    # the model's call: [B, N, H, d] views of one projection, read with their strides
    qkv = rand(B, 48, 3 * H * 64, dtype=torch.float16).requires_grad_()
    g = (-rand(B, 48, H).abs()).requires_grad_()
    views = [t.view(B, 48, H, 64) for t in qkv.chunk(3, dim=-1)]
    power_attention(*views, g, algorithm="chunk", chunk_size=16, backend="triton", layout="bnhd").sum().backward()
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            x = rand(3, 48, dtype=dtype)
            rms_norm(x, torch.ones(48, dtype=dtype), 1e-5, backend="triton")
            neg_softplus(x, backend="triton")
            kron(rand(2, 5, 16, dtype=dtype), backend="triton")
            w, bias = rand(48, 1, 2, dtype=dtype), rand(48, dtype=dtype)
            causal_conv1d(rand(2, 7, 48, dtype=dtype), w, bias, backend="triton")
            causal_conv1d_step(rand(2, 1, 48, dtype=dtype), torch.zeros(2, 1, 48, dtype=dtype), w, bias,
                               backend="triton")
            for rows in (1, 32, 64):  # decoding steps of batch 1 and 32, and the kernels' largest (MAX_ROWS)
                x, w = rand(rows, 64, dtype=dtype), rand(40, 64, dtype=dtype)
                linears(x, [w, w[:16], w, w], [None, rand(16, dtype=dtype), None, rand(40, dtype=dtype)], backend="triton")
                linears(x, [w, w[:16]], backend="triton")
                linear(x, w, residual=rand(rows, 40, dtype=dtype), backend="triton")
                linear(x, w, backend="triton")
                swiglu(x, w, w, backend="triton")


def _runtime_type(value):
    import torch

    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a kernel argument of type {type(value).__name__}")


def _aligned(value):
    """Whether the GPU's launcher would specialise this argument as divisible by 16 (pointers by their address,
    integers by value): the compiler then vectorises loads and pipelines them through shared memory."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def record(path):
    """Run ops_to_record() under the interpreter; pickle {(module, kernel, signature, constants, options,
    aligned)}, aligned the positions of the arguments divisible by 16."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        values = dict(zip(self.arg_names, args), **{k: v for k, v in kwargs.items() if k in params})
        constexpr = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
        signature = tuple((name, "constexpr" if name in constexpr else _runtime_type(values[name])) for name in params)
        constants = tuple((name, values[name]) for name in params if name in constexpr)
        options = tuple((k, v) for k, v in kwargs.items() if k in OPTIONS)
        aligned = tuple(i for i, name in enumerate(params) if name not in constexpr and _aligned(values[name]))
        launches.add((self.fn.__module__, self.fn.__name__, signature, constants, options, aligned))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    ops_to_record()
    Path(path).write_bytes(pickle.dumps(sorted(launches, key=repr)))


SHARED_MEMORY_LIMIT = 232448  # bytes a block of an H100 / H200 may use (the driver refuses a kernel past it)
HAS_PTXAS = (Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def compile_all(path):
    """Compile every recorded launch for sm_90; raise on the first kernel that does not compile or needs more
    shared memory than a Hopper block has (which only fails when the kernel is loaded on the GPU)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    launches = []
    for module, name, signature, constants, options, aligned in pickle.loads(Path(path).read_bytes()):
        launches.append((module, name, signature, dict(constants), options, aligned))
        if launches[-1][3].get("SKIP"):  # the interpreter records UNIFORM off (no inline PTX); sm_80+ GPUs set it
            launches.append((module, name, signature, dict(constants, UNIFORM=True), options, aligned))
    for module, name, signature, constants, options, aligned in launches:
        fn = getattr(importlib.import_module(module), name)
        while not isinstance(fn, JITFunction):  # an autotuned kernel wraps its JITFunction
            fn = fn.fn
        source = ASTSource(fn=fn, signature=dict(signature), constexprs=constants,
                           attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(options))
        except Exception as err:
            raise RuntimeError(f"{module}.{name} {constants} does not compile for sm_90: {err}") from err
        if compiled.metadata.shared > SHARED_MEMORY_LIMIT:
            raise RuntimeError(f"{module}.{name} {constants} needs {compiled.metadata.shared} bytes of shared "
                               f"memory, more than sm_90's {SHARED_MEMORY_LIMIT}")
        print(f"compiled {module}.{name} {constants}", flush=True)


def _run(mode, path, interpret):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, __file__, mode, str(path)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.skipif(not HAS_PTXAS, reason="this Triton wheel ships no ptxas")
def test_every_launched_kernel_compiles_for_sm90(tmp_path):
    launches = tmp_path / "launches.pkl"
    recorded = _run("record", launches, interpret=True)
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    kernels = {(module, name) for module, name, *_ in pickle.loads(launches.read_bytes())}
    assert len(kernels) >= 15, sorted(kernels)  # the attention, chunk, feature, recurrent, norm, conv, kron kernels
    compiled = _run("compile", launches, interpret=False)
    assert compiled.returncode == 0, compiled.stderr[-3000:]


def compile_gluon(path):
    """Compile the Gluon kernel of kernel/power/hopper.py that the JSON job at path names for sm_90 (no
    interpreter: it runs Gluon's reductions as Python); write its shared memory and ptxas -v's report beside it."""
    import json

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernel.power import hopper

    job = json.loads(Path(path).read_text())
    kernel = getattr(hopper, job["kernel"])
    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in job["constants"] else job["pointers"].get(p, "i32") for p in params}
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p in job["pointers"]}
    source = GluonASTSource(fn=kernel, signature=signature, constexprs=job["constants"], attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": job["num_warps"]})
    ptx = Path(path).with_suffix(".ptx")
    ptx.write_text(compiled.asm["ptx"])
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    info = subprocess.run([str(bin_dir / "ptxas"), "-v", "--gpu-name=sm_90a", str(ptx), "-o", os.devnull],
                          capture_output=True, text=True, check=True).stderr
    Path(path).with_suffix(".out").write_text(json.dumps({"shared": compiled.metadata.shared, "info": info}))


def _compile_gluon(tmp_path, kernel, pointers, constants, num_warps):
    """compile_gluon in a subprocess: (shared memory in bytes, ptxas -v's report)."""
    import json

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"kernel": kernel, "pointers": pointers, "constants": constants,
                               "num_warps": num_warps}))
    run = _run("gluon", job, interpret=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(job.with_suffix(".out").read_text())
    return out["shared"], out["info"]


@pytest.mark.skipif(not HAS_PTXAS, reason="this Triton wheel ships no ptxas")
@pytest.mark.parametrize("block_c", [64, 256])
def test_hopper_outer_compiles_for_sm90(tmp_path, block_c):
    """kernel/power/hopper.py's outer product (Gluon, which the interpreter cannot run) compiles for sm_90 at its
    shortest and longest block of tokens without spilling registers (ptxas -v), with registers and shared memory
    for two programs an SM (what its timing in bench/NOTES.md ran)."""
    hopper = pytest.importorskip("kernel.power.hopper")  # written for Triton 3.6's Gluon (requirements.txt)
    shared, info = _compile_gluon(tmp_path, "_outer_kernel",
                                  {"A": "*bf16", "B": "*bf16", "W": "*fp32", "OUT": "*bf16"},
                                  {"D": hopper.HEAD, "E": hopper.HEAD, "BLOCK_C": block_c}, hopper.NUM_WARPS)
    assert "0 bytes spill stores" in info, info
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    assert 2 * registers * 32 * hopper.NUM_WARPS <= 65536, info
    assert 2 * (shared + 1024) <= SHARED_MEMORY_LIMIT, shared  # 1 KB a block is the driver's


@pytest.mark.skipif(not HAS_PTXAS, reason="this Triton wheel ships no ptxas")
@pytest.mark.parametrize("weighted", [False, True])
def test_hopper_apply_compiles_for_sm90(tmp_path, weighted):
    """kernel/power/hopper.py's apply compiles for sm_90 with its launch constants, plain (float32 out, the
    forward's) and with token weights and an added term (bf16 out, the backward's), without spilling, with
    registers and shared memory for two programs an SM (what its timing in bench/NOTES.md ran)."""
    hopper = pytest.importorskip("kernel.power.hopper")
    launch = hopper.APPLY
    pointers = {"A": "*bf16", "M": "*bf16", "OUT": "*bf16" if weighted else "*fp32", "W": "*fp32", "B": "*bf16",
                "DW": "*fp32", "ADD": "*bf16"}
    constants = {"D": hopper.HEAD, "E": hopper.HEAD, "BLOCK_C": launch["BLOCK_C"], "HAS_W": weighted,
                 "HAS_ADD": weighted, "STAGES": launch["STAGES"], "GROUP": launch["GROUP"]}
    shared, info = _compile_gluon(tmp_path, "_apply_kernel", pointers, constants, launch["NUM_WARPS"])
    assert "0 bytes spill stores" in info, info
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    assert 2 * registers * 32 * launch["NUM_WARPS"] <= 65536, info
    assert 2 * (shared + 1024) <= SHARED_MEMORY_LIMIT, shared  # 1 KB a block is the driver's


@pytest.mark.skipif(not HAS_PTXAS, reason="this Triton wheel ships no ptxas")
def test_kernel_resources_reads_every_feature_kernel():
    """bench/kernel_resources.py, run as a script (no interpreter), captures the six launches of the feature
    products from their launchers and reads registers, spills and loops of each, and what Triton made of their
    operands: none of them reads a fixed operand back from shared memory inside a loop, feeds a product from
    shared memory where registers were meant, waits in every pass for a load that feeds a product, or falls back
    to mma.sync (each cost 3-12 % of a kernel on an H200, bench/NOTES.md sessions 29 and 30)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_resources.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if " registers, " in line]
    assert [row.split(" warps")[0].strip() for row in rows] == ["outer", "apply", "grad", "outer w", "apply w",
                                                                 "grad w"], run.stdout
    assert all(re.search(r"loops \d+ \(\d+\)", row) for row in rows), run.stdout
    operands = [re.search(r"in loops: (\d+) shared-memory reloads, (\d+) products reading shared memory, (\d+) loads "
                          r"feeding a product; (\d+) mma.sync", row) for row in rows]
    assert all(operands), run.stdout
    assert all(m.groups() == ("0", "0", "0", "0") for m in operands), run.stdout


if __name__ == "__main__":
    {"record": record, "compile": compile_all, "gluon": compile_gluon}[sys.argv[1]](sys.argv[2])
