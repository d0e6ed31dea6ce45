"""Power attention with state in and out: one op, three algorithms (docs/math.md#linear-time-form).

    quadratic  the N x N Triton kernel (kernel.attention), exact diagonal handling; O(N^2)
    chunk      quadratic inside chunks, a float32 state passed between them; O(N)   (chunk.py)
    recurrent  token by token; a fused one-token Triton step for decoding           (recurrent.py)
    naive      the token loop in plain PyTorch, the float64 ground truth             (naive.py)

The state of a head is one tensor M = [S, z] of shape [D, dv + 1] (float32; float64 for float64 inputs):
S = sum_j e^{a_N - a_j} phi(k_j) v_j^T and z = sum_j e^{a_N - a_j} phi(k_j), with phi(x) = x for power
"1" (D = d) and kron(x) for power "2" (D = d (d + 1) / 2), phi of the unscaled keys. A zero state is an
empty context, so a sequence split anywhere with the state passed on gives the output of one call. Every
algorithm takes a state of any strides; decoding caches allocate theirs with zero_state (column-major, the
one-token step's fastest layout).
"""
from __future__ import annotations

from ..attention import attention
from ..reference import bhnd_views, check_attention_args
from .chunk import chunk_power_attention, state_scan
from .naive import power_attention_naive, state_size, zero_state
from .recurrent import recurrent_power_attention, recurrent_step

ALGORITHMS = ("auto", "quadratic", "chunk", "recurrent")
# "auto" uses the chunked form from this many tokens on, per power; measured on an H200 with bench/attention.py
# (forward + backward, bf16, H = 16, d = 64, 32768 tokens, one run; bench/NOTES.md, session 26): power 2 quadratic
# 4.05 ms vs chunked 5.85 at 4K, 7.43 vs 5.90 at 8K; power 1 (unnormalised, session 24) 3.53 vs 4.62 at 4K, 6.60
# vs 3.97 at 8K.
CHUNK_CROSSOVER = {"1": 8192, "2": 8192}
# The same under activation checkpointing, where the chunked form keeps no per-chunk states but forms them again
# in the backward pass (recompute_states) and the quadratic kernel keeps its few tensors
# (GPT_Trainer/LlamaDecoderLayerClean.py). Power 2: training the small model at 8K (bench/train_throughput.py,
# 32768 tokens a step, bench/NOTES.md session 29) ran 109.3k tokens/s with the chunked form (`--chunk_from 8192`)
# against 103.7k with the quadratic kernel in the same call (the op alone: 6.38-6.85 ms against 7.43), peaking
# 1.7 GiB higher; at 4K the quadratic kernel's 4.05 ms beats it. Power 1 recomputes only d x dv states (small
# products); at 8K its quadratic kernel took 6.60 ms against 3.97 + 1.74 for the chunked form with a whole second
# forward (session 24).
RECOMPUTED_CHUNK_CROSSOVER = {"1": 8192, "2": 8192}
CHUNK_SIZE = 256  # the faster of 128 and 256 (bench/NOTES.md): half the state traffic of 128 for a longer quadratic part

__all__ = ["auto_algorithm", "power_attention", "power_attention_naive", "recurrent_step", "state_scan", "state_size",
           "zero_state", "ALGORITHMS"]


def _check_state(state, q, v, power):
    B, H, _, d = q.shape
    shape = (B, H, state_size(d, power), v.shape[-1] + 1)
    if tuple(state.shape) != shape:
        raise ValueError(f"initial_state must be [B, H, D, dv + 1] = {shape} for power {power!r}, got {tuple(state.shape)}")


def auto_algorithm(N, power, *, recompute_states=False):
    """What "auto" runs for N tokens without a state: "chunk" from the measured crossover on, else "quadratic"
    (always for power "exp"). recompute_states: the crossover where the chunked form forms its states again in
    the backward pass (as activation checkpointing runs it)."""
    if power == "exp":
        return "quadratic"
    if power not in CHUNK_CROSSOVER:
        raise ValueError(f"power must be one of {[*CHUNK_CROSSOVER, 'exp']}, got {power!r}")
    crossover = (RECOMPUTED_CHUNK_CROSSOVER if recompute_states else CHUNK_CROSSOVER)[power]
    return "chunk" if N >= crossover else "quadratic"


def power_attention(q, k, v, g=None, *, power="2", normalize=True, scale=None, initial_state=None,
                    output_final_state=False, inplace=False, algorithm="auto", chunk_size=CHUNK_SIZE,
                    recompute_states=False, backend="auto", layout="bhnd"):
    """Causal power attention, o_i = sum_{j<=i} w_ij v_j (/ sum_{j<=i} w_ij), with state in and out.

    q, k: [B, H, N, d]; v: [B, H, N, dv]; g: per-token log decay [B, H, N] (<= 0) or None; power "1"
    (w = s), "2" (w = s^2) or "exp" (w = e^s), s = scale * q.k, scale 1/sqrt(d) by default.
    initial_state: a state returned by an earlier call (any algorithm) or None (empty context). k and v are
    taken in q's dtype (cast, as kernel.attention does). Returns o in q's dtype, or (o, final_state) with
    output_final_state=True. Power "exp" has no finite state and runs the quadratic kernel only. backend
    ("auto", "triton", "torch") picks the kernels.
    inplace=True (with initial_state and output_final_state) writes the final state into initial_state and
    returns that tensor: decoding into static buffers (the one-token step then updates it without a copy).
    recompute_states=True (training under activation checkpointing): the chunked form keeps no per-chunk states
    for the backward pass (~8x the values' size for power "2") but forms them again there, and "auto" takes the
    crossover measured with that recompute; no effect on the other algorithms, which keep none.
    layout "bnhd": q, k, v [B, N, H, d], g [B, N, H], o [B, N, H, dv] (the state is [B, H, D, dv + 1] in both);
    the quadratic kernel and the chunked form's GPU kernels (power 2) read and write that layout with its strides;
    the other paths transpose it.
    """
    views = bhnd_views(layout, q, k, v, g)
    scale = check_attention_args(*views, power, scale)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    stateful = initial_state is not None or output_final_state
    if power == "exp":
        if stateful or algorithm not in ("auto", "quadratic"):
            raise ValueError("power 'exp' has no finite state: only algorithm 'quadratic' (or 'auto') without "
                             "initial_state/output_final_state; decode it with a KV cache")
        return attention(q, k, v, g, power=power, normalize=normalize, scale=scale, backend=backend, layout=layout)
    if initial_state is not None:
        _check_state(initial_state, views[0], views[2], power)
    if inplace and (initial_state is None or not output_final_state):
        raise ValueError("inplace=True needs initial_state and output_final_state=True")
    N = views[0].shape[2]
    if algorithm == "auto":
        algorithm = "recurrent" if N == 1 and stateful else auto_algorithm(N, power, recompute_states=recompute_states)
    if algorithm == "quadratic" and not stateful:
        return attention(q, k, v, g, power=power, normalize=normalize, scale=scale, backend=backend, layout=layout)
    q, g = views[0], views[3]
    k, v = views[1].to(q.dtype), views[2].to(q.dtype)
    if algorithm == "recurrent":
        result = recurrent_power_attention(q, k, v, g, power=power, normalize=normalize, scale=scale,
                                           initial_state=initial_state, output_final_state=output_final_state,
                                           inplace=inplace, backend=backend)
    else:  # the quadratic algorithm with a state is the chunked one with a single chunk
        o, final = chunk_power_attention(q, k, v, g, power=power, scale=scale, normalize=normalize,
                                         initial_state=initial_state, output_final_state=output_final_state,
                                         chunk_size=N if algorithm == "quadratic" else chunk_size,
                                         recompute_states=recompute_states, backend=backend, layout=layout)
        result = (o, final) if output_final_state else o
    if inplace and result[1] is not initial_state:
        initial_state.copy_(result[1])
        result = (result[0], initial_state)
    if output_final_state:
        return bhnd_views(layout, result[0])[0], result[1]
    return bhnd_views(layout, result)[0]
