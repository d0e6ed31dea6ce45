"""Count the copies (aten::copy_: .contiguous(), dtype casts, reshapes of strided views) and the bytes they
move, in one forward + backward of the generic 2Mamba block and in one training step of a model.

Runs anywhere: on a CPU the Triton kernels run under TRITON_INTERPRET=1 (set here when there is no GPU),
so the counts are those of the GPU code path; the interpreter's own copies of the kernel arguments are left
out. bf16 autocast as in training (on a CPU the interpreter's bf16 values are garbage; only the counts and
bytes are meant). Bytes = bytes read + bytes written by each copy_.

    python bench/copy_count.py [--type 2mamba] [--batch 2 --seq 256 --model_size tiny] [--chunked]

--chunked: power 1 and 2 take the linear-time chunked form at any length (kernel.power's crossovers set to 1),
to set its copies beside the quadratic kernel's.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, TWO_MAMBA_E, GenericAttention, attention_config  # noqa: E402
from GPT_Trainer.modeling import get_model, make_config  # noqa: E402
from train_throughput import chunked_from, training_step  # noqa: E402  (bench/ is on sys.path: the script runs from it)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = {"2mamba": TWO_MAMBA, "2mamba-e": TWO_MAMBA_E, "softmax": "softmax"}
LAUNCH = "triton_interpreter_launch"
ELEMENT_SIZE = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4, "bool": 1,
                "unsigned char": 1, "signed char": 1, "short int": 2}


def _mark_interpreter_launches():
    """Wrap each interpreted kernel launch in a profiler range so that its argument copies can be left out."""
    from triton.runtime import interpreter

    launch = interpreter.GridExecutor.__call__
    if getattr(launch, "_marked", False):
        return

    def marked(self, *args, **kwargs):
        with torch.profiler.record_function(LAUNCH):
            return launch(self, *args, **kwargs)

    marked._marked = True
    interpreter.GridExecutor.__call__ = marked


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def count_copies(fn, batch, seq):
    """{(source op, pass, per token): [calls, bytes]} of the aten::copy_ calls made by fn(); per token: the
    copied tensor has the batch and token dims (an activation, not a parameter or its gradient)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        _mark_interpreter_launches()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    table = collections.defaultdict(lambda: [0, 0])
    for ev in prof.events():
        if ev.name != "aten::copy_":
            continue
        chain, parent = [], ev.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if LAUNCH in chain:
            continue
        aten = [n for n in chain if n.startswith("aten::")]
        source = aten[-1] if aten else "aten::copy_"  # the op the Python code called
        backward = any(n.startswith("autograd::engine") for n in chain)
        shapes, dtypes = ev.input_shapes, ev.input_dtypes
        nbytes = sum(_numel(shapes[i]) * ELEMENT_SIZE.get(dtypes[i], 4) for i in (0, 1))
        shape = shapes[0]
        per_token = batch * seq in shape or (len(shape) > 1 and shape[0] == batch and seq in shape[1:])
        entry = table[(source, "bwd" if backward else "fwd", per_token)]
        entry[0] += 1
        entry[1] += nbytes
    return dict(table)


# On a CPU only: the per-channel copies inside the depthwise nn.functional.conv1d (cuDNN makes none).
CPU_CONV = ("aten::conv1d", "aten::convolution_backward")


def report(title, table, unit):
    """Print the table; bytes also in units of `unit` bytes (one bf16 [B, N, hidden] activation).

    Totals: all copies; the activation copies (per token, what grows with the tokens of a step; the rest are
    autocast's casts of parameters and of their gradients), without the CPU-only conv internals."""
    calls = sum(c for c, _ in table.values())
    nbytes = sum(b for _, b in table.values())
    own = [(c, b) for (source, _, per_token), (c, b) in table.items() if per_token and source not in CPU_CONV]
    own_calls, own_bytes = sum(c for c, _ in own), sum(b for _, b in own)
    print(f"\n{title}: {calls} copy_ calls, {nbytes / 2**20:.2f} MiB moved; activation copies (without the CPU "
          f"conv's internals): {own_calls} calls, {own_bytes / unit:.1f} x one bf16 [B, N, hidden]")
    for (source, phase, per_token), (c, b) in sorted(table.items(), key=lambda kv: -kv[1][1]):
        kind = "activation" if per_token else "parameter"
        print(f"  {phase} {kind:<10} {source:<28} {c:>5} calls {b / 2**20:>9.2f} MiB {b / unit:>7.1f} x")
    return calls, nbytes


def block_pass(attention_type, batch, seq, hidden, heads, checkpoint):
    torch.manual_seed(0)
    block = GenericAttention(hidden, heads, attention_config(attention_type)).to(DEVICE)
    block.checkpoint_core = checkpoint
    h = torch.randn(batch, seq, hidden, device=DEVICE, requires_grad=True)  # fp32, as input_layernorm gives it
    dout = torch.randn(batch, seq, hidden, device=DEVICE, dtype=torch.bfloat16)

    def run():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = block(h)
        out.backward(dout.to(out.dtype))

    return run


def train_step(attention_type, batch, seq, model_size, vocab):
    torch.manual_seed(0)
    model = get_model(model_size, seq, vocab, attention_type).to(DEVICE).train()
    model.set_activation_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens = torch.randint(3, vocab, (batch, seq + 1), device=DEVICE)

    return lambda: training_step(model, tokens, optimizer, DEVICE)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--type", choices=list(TYPES), default="2mamba")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--seq", type=int, default=48, help="B*N (144) must not be a parameter dimension")
    parser.add_argument("--hidden", type=int, default=256, help="block only")
    parser.add_argument("--heads", type=int, default=4, help="block only (d = hidden / heads: 64 as in the small model)")
    parser.add_argument("--model_size", default="tiny", help="training step only")
    parser.add_argument("--vocab", type=int, default=512, help="training step only")
    parser.add_argument("--chunked", action="store_true", help="the chunked form at any length")
    args = parser.parse_args(argv)
    if args.chunked:
        chunked_from(1)
    # the Triton kernels run on CUDA, or on a CPU through the interpreter
    os.environ.setdefault("TWOMAMBA_ATTENTION_BACKEND", "triton")
    attention_type = TYPES[args.type]
    if attention_type != "softmax":
        run = block_pass(attention_type, args.batch, args.seq, args.hidden, args.heads, checkpoint=True)
        run()  # warm-up: autotuning, lazy initialisation
        report(f"block fwd+bwd ({args.type}, B={args.batch}, N={args.seq}, hidden={args.hidden}, H={args.heads}, "
               f"bf16 autocast, checkpointed core)", count_copies(run, args.batch, args.seq),
               2 * args.batch * args.seq * args.hidden)
    run = train_step(attention_type, args.batch, args.seq, args.model_size, args.vocab)
    run()
    report(f"training step ({args.type}, {args.model_size} model, B={args.batch}, N={args.seq}, bf16 autocast, "
           f"activation checkpointing, AdamW)", count_copies(run, args.batch, args.seq),
           2 * args.batch * args.seq * make_config(args.model_size, args.seq, args.vocab, attention_type).hidden_size)


if __name__ == "__main__":
    main()
