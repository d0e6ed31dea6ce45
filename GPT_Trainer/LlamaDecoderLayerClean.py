"""The attention types of the paper (the `configs` dictionary) and the Llama decoder layer that hosts them.

Every type except `softmax` and `mamba` is one generic block (`GenericAttention`) driven by an
`AttentionConfig` built from its `configs` entry. Every block owns its decoding cache (GPT_Trainer/cache.py):
`new_cache` allocates it and `forward(h, cache, padding)` reads and updates it, so prefill (the forward
over a prompt) and a step (the forward over one token) are the same code; docs/inference.md describes what
each type keeps.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from GPT_Trainer.cache import KVState, RecurrentState
from kernel import (attention, causal_conv1d, causal_conv1d_step, linear, linears, neg_softplus, power_attention,
                    rms_norm, swiglu)
from kernel.power import state_size, zero_state
from kernel.reference import bhnd_views


@dataclass(frozen=True)
class AttentionConfig:
    """Fields of the generic block; the defaults are the plain linear-attention baseline."""

    power: str = "1"  # "1" linear, "2" squared, "exp" exponentiated
    qk_activation_type: str = "none"  # relu | silu | none, applied to q and k after the conv
    use_in_conv: bool = False
    in_conv_dim: int = 2
    use_NoPE: bool = True
    use_D_res: bool = False
    use_z_out_gate: bool = False
    norm_type: str = "output_norm"  # sm_norm | output_norm
    use_dt_bias: bool = False
    value_disc_dtype: str = "none"  # dt | none
    A_mask_type: str = "none"  # none | discretize | neg_softplus

    def __post_init__(self):
        allowed = {
            "power": ("1", "2", "exp"),
            "qk_activation_type": ("relu", "silu", "none"),
            "norm_type": ("sm_norm", "output_norm"),
            "value_disc_dtype": ("dt", "none"),
            "A_mask_type": ("none", "discretize", "neg_softplus"),
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"attention config field {name}={getattr(self, name)!r}; allowed: {values}")
        if self.use_in_conv and self.in_conv_dim < 1:
            raise ValueError(f"in_conv_dim must be >= 1, got {self.in_conv_dim}")
        if not self.use_NoPE:
            raise ValueError("the generic block has no positional encoding: use_NoPE must be True")

    @property
    def uses_dt(self) -> bool:
        return self.value_disc_dtype == "dt" or self.A_mask_type == "discretize"


def _generic(**fields_):
    return {"type": "generic", **fields_}


_OUT = dict(norm_type="output_norm")
_NEG_CONV2 = dict(norm_type="output_norm", A_mask_type="neg_softplus", use_in_conv=True, in_conv_dim=2)
_NEG_CONV2_DT = dict(_NEG_CONV2, value_disc_dtype="dt")

# The 28 attention types of the paper, exactly as the seed names them (README.md, "Attention types").
configs: dict[str, dict] = {
    "softmax": {"type": "softmax"},
    "mamba": {"type": "mamba"},
    "linear": _generic(power="1", qk_activation_type="relu", norm_type="sm_norm"),
    "linear__output_norm": _generic(**_OUT),
    "linear__output_norm__ReLU": _generic(**_OUT, qk_activation_type="relu"),
    **{f"linear__output_norm__in_conv_k_{k}": _generic(**_OUT, use_in_conv=True, in_conv_dim=k) for k in (2, 3, 4)},
    **{
        f"linear__output_norm__in_conv_k_{k}__silu": _generic(**_OUT, use_in_conv=True, in_conv_dim=k, qk_activation_type="silu")
        for k in (2, 3, 4)
    },
    "linear__output_norm__D_res": _generic(**_OUT, use_D_res=True),
    "linear__output_norm__Z_out_gate": _generic(**_OUT, use_z_out_gate=True),
    "linear__output_norm__dt_on_values": _generic(**_OUT, value_disc_dtype="dt"),
    "linear__output_norm__A_mask_type_discretize": _generic(**_OUT, A_mask_type="discretize"),
    "linear__output_norm__A_mask_type_neg_softplus": _generic(**_OUT, A_mask_type="neg_softplus"),
    "linear__output_norm__A_mask_type_discretize__in_conv_k_2": _generic(
        **_OUT, A_mask_type="discretize", use_in_conv=True, in_conv_dim=2
    ),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2": _generic(**_NEG_CONV2),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values": _generic(**_NEG_CONV2_DT),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__silu": _generic(
        **_NEG_CONV2_DT, qk_activation_type="silu"
    ),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__D_res": _generic(**_NEG_CONV2_DT, use_D_res=True),
    "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__Z_out_gate": _generic(
        **_NEG_CONV2_DT, use_z_out_gate=True
    ),
    "squared__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values": _generic(**_NEG_CONV2_DT, power="2"),
    "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values": _generic(
        **dict(_NEG_CONV2_DT, norm_type="sm_norm"), power="2"
    ),
    "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2": _generic(**dict(_NEG_CONV2, norm_type="sm_norm"), power="2"),
    "linear__out_norm__A_mask_type_neg_softplus__in_conv_k_2": _generic(**_NEG_CONV2),
    "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values": _generic(
        **dict(_NEG_CONV2_DT, norm_type="sm_norm"), power="exp"
    ),
    "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2": _generic(**dict(_NEG_CONV2, norm_type="sm_norm"), power="exp"),
}

TWO_MAMBA = "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"
TWO_MAMBA_E = "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"


def attention_config(attention_type: str) -> AttentionConfig | str:
    """The typed config of a generic type, or "softmax" / "mamba"."""
    if attention_type not in configs:
        raise ValueError(f"unknown attention type {attention_type!r}; valid types:\n  " + "\n  ".join(configs))
    entry = dict(configs[attention_type])
    kind = entry.pop("type")
    return AttentionConfig(**entry) if kind == "generic" else kind


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class RMSNorm(nn.Module):
    """Llama RMSNorm computed in float32 (parameter name `weight`)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # weight * F.rms_norm(x.float(), ...).to(x.dtype), as one Triton kernel on CUDA when no gradient is
        # needed (kernel/norm.py)
        return rms_norm(x, self.weight, self.eps)


def cached_causal_conv(x, weight, bias=None, conv_state=None, fresh=False):
    """Causal depthwise conv of x [B, N, C] continuing after the rows in conv_state [B, k-1, C] (zeros = the
    conv's zero padding), which then holds the last k-1 input rows. Without a state: the plain conv. fresh:
    the state holds no tokens yet (a prompt into a new cache), so the plain conv is exact without a window
    [state, x] (a copy of x)."""
    if conv_state is None:
        return causal_conv1d(x, weight, bias)
    if x.shape[1] == 1:
        return causal_conv1d_step(x, conv_state, weight, bias)
    if fresh:
        keep = min(conv_state.shape[1], x.shape[1])  # rows before x stay the zeros of an empty context
        if keep:
            conv_state[:, conv_state.shape[1] - keep:] = x[:, x.shape[1] - keep:]
        return causal_conv1d(x, weight, bias)
    window = torch.cat([conv_state, x], dim=1)
    y = causal_conv1d(window, weight, bias)[:, conv_state.shape[1]:]
    conv_state.copy_(window[:, window.shape[1] - conv_state.shape[1]:])
    return y


def _plain(*layers) -> bool:
    """Whether these Linear layers may run through kernel/dense.py's launches, which read their weights: plain
    nn.Linear without hooks. A wrapped or hooked layer (an adapter, a quantised replacement) is called as a
    module, so nothing it adds is lost."""
    return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in layers)


def _plain_unbiased(*layers) -> bool:
    """_plain, and without biases (kernel.linear and kernel.swiglu take none)."""
    return _plain(*layers) and all(m.bias is None for m in layers)


def project_in(x, layers):
    """[layer(x) for each], one launch when decoding (kernel.linears)."""
    if _plain(*layers):
        return linears(x, [m.weight for m in layers], [m.bias for m in layers])
    return [m(x) for m in layers]


def project_out(x, layer, residual=None):
    """layer(x), plus residual when given (added in the product's kernel when decoding, kernel.linear)."""
    if _plain_unbiased(layer):
        return linear(x, layer.weight, residual=residual)
    y = layer(x)
    return y if residual is None else residual + y


def causal_mask(n, valid):
    """Which of L tokens each of the n newest sees ([B, 1, n, L] bool, valid [B, L] False at left padding):
    itself and the earlier tokens that are not padding (a padding query sees only itself, so every row of
    the attention stays finite)."""
    length = valid.shape[1]
    q_pos = torch.arange(length - n, length, device=valid.device)[:, None]
    k_pos = torch.arange(length, device=valid.device)
    return (k_pos <= q_pos) & (valid[:, None, None, :] | (k_pos == q_pos))


def kv_context(k, v, a, entry, padding):
    """What n new tokens (k, v [B, H, n, d]; a [B, H, n] their cumulative log decay or None) attend to:
    (keys, values, key decays, allowed [B, 1, n, L] bool), after writing them into the cache entry (KVState,
    or None). allowed None: the tokens are the whole causal context (a fresh unpadded prompt), for the fused
    kernels. A one-token step takes the fixed-shape path: all capacity slots, the entry's mask."""
    n = k.shape[2]
    if entry is None:
        return k, v, a, None if padding is None else causal_mask(n, padding)
    if n == 1 and padding is None:
        keys, values, a_keys = entry.step(k, v, a)
        return keys, values, a_keys, entry.valid[:, None, None, :]
    fresh = entry.length == n
    keys, values, a_keys, valid = entry.append(k, v, a, padding)
    return keys, values, a_keys, None if fresh and padding is None else causal_mask(n, valid)


def masked_attention(q, k, v, allowed, *, decay=None, normalize=True):
    """Attention of n queries over L keys (a KV cache, or a left-padded batch).

    q [B, H, n, d]; k, v [B, H, L, d]; allowed [B or 1, 1, n, L] bool: the keys each query sees (at least
    one per row); decay (a_q [B, H, n], a_k [B, H, L]) cumulative log decays in float64, adding a_i - a_j to
    the score. normalize: softmax over the keys; otherwise the exp-type weights exp(s + a_i - a_j) without
    normalisation.
    """
    scale = q.shape[-1] ** -0.5
    score_bias = 0.0 if decay is None else (decay[0][..., :, None] - decay[1][..., None, :]).float()  # [B, H, n, L]
    bias = torch.where(allowed, score_bias, float("-inf"))
    if normalize:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)
    scores = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale + bias
    return (scores.exp() @ v.float()).to(q.dtype)


def _zero_padding(x, padding):
    """x [B, N, ...] with the rows at left padding (padding [B, N] False) set to 0."""
    return x if padding is None else x.masked_fill(~padding.view(*padding.shape, *([1] * (x.dim() - 2))), 0)


SIDE_PROJECTIONS = ("dt_proj", "A_mask_proj", "z_gate_proj")  # a generic block's projections of h besides qkv


class GenericAttention(nn.Module):
    """The parameterised linear / squared / exp attention block (README.md, "Attention types").

    Powers 1 and 2 run kernel.power_attention, whose state is the block's cache; the exp types have no
    finite state and keep a KV cache.
    """

    def __init__(self, hidden_size: int, num_heads: int, cfg: AttentionConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg, self.num_heads, self.layer_idx = cfg, num_heads, layer_idx
        self.head_dim = hidden_size // num_heads
        inner = num_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        if cfg.use_in_conv:
            self.conv1d = nn.Conv1d(3 * inner, 3 * inner, cfg.in_conv_dim, groups=3 * inner, bias=True)
        if cfg.uses_dt:
            self.dt_proj = nn.Linear(hidden_size, num_heads, bias=False)
            if cfg.use_dt_bias:
                self.dt_bias = nn.Parameter(torch.empty(num_heads))
        if cfg.A_mask_type == "discretize":
            self.A_log = nn.Parameter(torch.empty(num_heads))
        elif cfg.A_mask_type == "neg_softplus":
            self.A_mask_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if cfg.use_D_res:
            self.D = nn.Parameter(torch.ones(num_heads, self.head_dim))
        if cfg.use_z_out_gate:
            self.z_gate_proj = nn.Linear(hidden_size, inner, bias=True)
        if cfg.norm_type == "output_norm":
            self.out_norm = nn.RMSNorm(inner)
        self.reset_special_parameters()
        self.checkpoint_core = False

    @torch.no_grad()
    def reset_special_parameters(self):
        """Mamba-style inits that the generic Linear init must not overwrite."""
        if hasattr(self, "A_log"):
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        if hasattr(self, "dt_bias"):
            self.dt_bias.copy_(_mamba_dt_bias_init(self.dt_bias.shape[0]))
        if hasattr(self, "D"):
            self.D.fill_(1.0)

    @property
    def normalize(self) -> bool:
        return self.cfg.norm_type == "sm_norm"

    def new_cache(self, batch: int, device, dtype, capacity: int):
        """This block's empty cache entry for `batch` sequences (`capacity`: KV slots allocated up front)."""
        cfg, d = self.cfg, self.head_dim
        conv = None
        if cfg.use_in_conv:
            conv = torch.zeros(batch, cfg.in_conv_dim - 1, self.conv1d.in_channels, device=device, dtype=dtype)
        if cfg.power == "exp":
            return KVState.empty(batch, self.num_heads, d, d, capacity, device, dtype,
                                 decayed=cfg.A_mask_type != "none", conv=conv)
        return RecurrentState(conv, zero_state(batch, self.num_heads, state_size(d, cfg.power), d, device))

    def projections(self, h):
        """qkv [B,N,3Hd] and the side projections {name: output} the config has (dt_proj, A_mask_proj,
        z_gate_proj) of the layer input h: one launch when decoding (kernel/dense.py)."""
        names = [name for name in SIDE_PROJECTIONS if hasattr(self, name)]
        layers = [self.qkv_proj] + [getattr(self, name) for name in names]
        qkv, *side = project_in(h, layers)
        return qkv, dict(zip(names, side))

    def project(self, qkv, side):
        """From the (conv'd) qkv [B,N,3Hd] and the side projections: q, k, v as [B,N,H,d] views of qkv (the
        layout the kernels take, so nothing is transposed or copied), the per-token log decay g [B,N,H] (or
        None), the values the D residual multiplies (v before discretisation, or None) and the Z gate."""
        cfg = self.cfg
        b, n, _ = qkv.shape
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim) for t in qkv.chunk(3, dim=-1))
        dt = None
        if cfg.uses_dt:  # softplus in fp32: dt and the decay go into a float64 cumsum over the sequence
            dt_in = side["dt_proj"].float()
            if cfg.use_dt_bias:
                dt_in = dt_in + self.dt_bias
            dt = F.softplus(dt_in)
        g = None
        if cfg.A_mask_type == "discretize":
            g = -torch.exp(self.A_log.float()) * dt
        elif cfg.A_mask_type == "neg_softplus":
            g = neg_softplus(side["A_mask_proj"])  # -softplus in float32
        v_res = v if cfg.use_D_res else None
        if cfg.value_disc_dtype == "dt":
            v = v * dt[..., None].to(v.dtype)
        if cfg.qk_activation_type == "relu":
            q, k = F.relu(q), F.relu(k)
        elif cfg.qk_activation_type == "silu":
            q, k = F.silu(q), F.silu(k)
        z = F.silu(side["z_gate_proj"]) if cfg.use_z_out_gate else None
        return q, k, v, g, v_res, z

    def finish(self, o, v_res, z, residual=None):
        """o: [B, N, H, d] core output (in the core's dtype: under autocast o_proj takes it as it is) ->
        [B, N, D_model], plus residual when given."""
        if v_res is not None:
            o = torch.addcmul(o, v_res, self.D.to(o.dtype))  # the D residual, D [H, d] broadcast
        b, n = o.shape[:2]
        o = o.reshape(b, n, -1)
        if z is not None:
            o = o * z
        if self.cfg.norm_type == "output_norm":
            o = self.out_norm(o.to(self.out_norm.weight.dtype))  # the norm in its parameters' precision
        return project_out(o, self.o_proj, residual)

    def forward(self, h, cache=None, padding=None, residual=None):
        """h [B, N, D_model]; cache: a TwoMambaCache continued by these N tokens; padding [B, N] bool, False at
        left padding (those tokens leave no trace in the output of the others nor in the cache); residual
        [B, N, D_model]: added to the output (in the output projection's kernel when decoding)."""
        entry = None if cache is None else cache.entry(self.layer_idx, self, h)
        h = _zero_padding(h, padding)  # zero pre-conv rows: the conv sees the zero padding of a shorter prompt
        qkv, side = self.projections(h)
        if self.cfg.use_in_conv:
            qkv = cached_causal_conv(qkv, self.conv1d.weight, self.conv1d.bias, None if entry is None else entry.conv,
                                     fresh=cache is not None and cache.seen_tokens == 0)
        q, k, v, g, v_res, z = self.project(qkv, side)
        if self.cfg.power == "exp" and (entry is not None or padding is not None):
            o = self._kv_core(q, k, v, g, entry, padding)
        else:  # padding keys are zero, so they add nothing to a state
            o = self._state_core(q, _zero_padding(k, padding), v, g, entry)
        return self.finish(o, v_res, z, residual)

    def _state_core(self, q, k, v, g, entry):
        """power_attention on [B, N, H, d]: powers 1 and 2 with or without a state, the exp types over a whole
        unpadded sequence without a cache (the training op)."""
        op = functools.partial(power_attention, power=self.cfg.power, normalize=self.normalize, layout="bnhd")
        if entry is None:
            # Under checkpointing the chunked form keeps no per-chunk states (~8x the values' size) for the
            # backward pass but forms them again there; the quadratic kernel keeps its output, o without the
            # diagonal term and three per-row statistics (~2x the values' size), less than a second forward is
            # worth. Neither runs its whole forward twice; "auto" picks between them at the crossover measured so.
            return op(q, k, v, g, recompute_states=self.checkpoint_core and torch.is_grad_enabled())
        return op(q, k, v, g, initial_state=entry.state, output_final_state=True, inplace=True)[0]

    def _kv_core(self, q, k, v, g, entry, padding):
        """The exp types on [B, N, H, d] with a KV cache (which holds [B, H, N, d]) or left padding."""
        q, k, v, g = bhnd_views("bnhd", q, k, v, g)
        a = None if g is None else g.double().cumsum(-1)
        if a is not None and entry is not None:
            a = a + entry.a_last
        keys, values, a_keys, allowed = kv_context(k, v, a, entry, padding)
        if allowed is None:  # a prefill into an empty cache
            o = attention(q, k, v, g, power="exp", normalize=self.normalize)
        else:
            o = masked_attention(q, keys, values, allowed, decay=None if a is None else (a, a_keys),
                                 normalize=self.normalize)
        return o.transpose(1, 2)


def rotary_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE (channels (0,1), (2,3), ... rotate together) on x [B, N, ..., d] for the positions
    [N] of its tokens (a tensor on x's device, so a step's position is never a host value); a pair is a
    complex number turned by the angle position * freq (float32)."""
    angles = positions.float()[:, None] * freqs.float()
    turn = torch.polar(torch.ones_like(angles), angles).view(len(positions), *[1] * (x.dim() - 3), -1)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Holds the frequencies as the (frozen) parameter `freqs`, as rotary-embedding-torch does."""

    def __init__(self, dim: int):
        super().__init__()
        self.freqs = nn.Parameter(rotary_frequencies(dim), requires_grad=False)

    def forward(self, x, positions):
        return apply_rotary(x, self.freqs, positions)


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with interleaved RoPE and a KV cache; a token's RoPE position is its cache slot
    (left padding included), which leaves every query-key distance, hence every score, unchanged."""

    def __init__(self, hidden_size: int, num_heads: int, layer_idx: int = 0):
        super().__init__()
        self.num_heads, self.head_dim, self.layer_idx = num_heads, hidden_size // num_heads, layer_idx
        inner = num_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim)

    def new_cache(self, batch: int, device, dtype, capacity: int):
        return KVState.empty(batch, self.num_heads, self.head_dim, self.head_dim, capacity, device, dtype, decayed=False)

    def project(self, h, positions):
        """q (rotated), k (rotated), v: [B, H, N, d] for tokens at positions [N] (a device tensor)."""
        b, n, _ = h.shape
        qkv = project_in(h, [self.qkv_proj])[0].view(b, n, 3, self.num_heads, self.head_dim)
        q, k = self.rotary_emb(qkv[:, :, :2], positions).unbind(2)  # q and k turned in one go
        return q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)

    def finish(self, o, residual=None):
        b, _, n, _ = o.shape
        return project_out(o.transpose(1, 2).reshape(b, n, -1), self.o_proj, residual)

    @staticmethod
    def core(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, h, cache=None, padding=None, residual=None):
        """As GenericAttention.forward."""
        entry = None if cache is None else cache.entry(self.layer_idx, self, h)
        n = h.shape[1]
        q, k, v = self.project(h, torch.arange(n, device=h.device) if entry is None else entry.positions(n))
        keys, values, _, allowed = kv_context(k, v, None, entry, padding)
        if allowed is None:  # never recomputed: SDPA keeps only its output and a per-row statistic
            o = self.core(q, k, v)
        else:
            o = masked_attention(q, keys, values, allowed)
        return self.finish(o, residual)


def _mamba_dt_bias_init(n: int, dt_min=0.001, dt_max=0.1, floor=1e-4) -> torch.Tensor:
    """Mamba-2's dt bias: softplus^-1 of dt log-uniform in [dt_min, dt_max], floored."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2(nn.Module):
    """Pure-PyTorch Mamba-2 block with mamba_ssm.Mamba2's parameter names and math, for the seed's settings
    (d_conv 2, expand 1, one SSM head of width d_ssm, ngroups 1, gated RMSNorm, no biases)."""

    def __init__(self, d_model: int, d_ssm: int, d_state: int = 128, d_conv: int = 2):
        super().__init__()
        self.d_model, self.d_ssm, self.d_state, self.nheads = d_model, d_ssm, d_state, 1
        self.headdim = d_ssm
        self.d_inner = d_model
        conv_dim = d_ssm + 2 * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(_mamba_dt_bias_init(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(d_ssm))
        self.norm = RMSNorm(d_ssm, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def reset_special_parameters(self):
        self.dt_bias.copy_(_mamba_dt_bias_init(self.nheads))
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    @property
    def d_mlp(self) -> int:
        return (self.in_proj.out_features - 2 * self.d_ssm - 2 * self.d_state - self.nheads) // 2

    def new_cache(self, batch: int, device, dtype, capacity: int) -> RecurrentState:
        conv = torch.zeros(batch, self.conv1d.kernel_size[0] - 1, self.conv1d.in_channels, device=device, dtype=dtype)
        return RecurrentState(conv, zero_state(batch, self.nheads, self.d_state, self.d_ssm, device))

    def project(self, h):
        """in_proj(h) as (z0, x0, z, xBC, dt). in_proj's width, 2 d_inner + 2 d_state + nheads (2305 for `small`), is
        odd: cuBLAS then takes its unaligned kernels, which ran 113 of the 277 ms of a training step of the small
        model on an H200 (bench/NOTES.md, session 38). A plain in_proj runs as two products instead, the rows before
        dt's (an aligned width) and dt's (one launch when decoding, kernel.linears); a hooked or wrapped one as a
        module (_plain)."""
        widths = [self.d_mlp, self.d_mlp, self.d_ssm, self.d_ssm + 2 * self.d_state]
        if not _plain(self.in_proj):
            return torch.split(self.in_proj(h), widths + [self.nheads], dim=-1)
        w, b, n = self.in_proj.weight, self.in_proj.bias, self.nheads
        zxbc, dt = linears(h, [w[:-n], w[-n:]], None if b is None else [b[:-n], b[-n:]])
        return (*torch.split(zxbc, widths, dim=-1), dt)

    def forward(self, h, entry: RecurrentState | None = None):
        """h [B, N, d_model]; entry: this block's cache entry (conv rows and SSD state), continued and updated."""
        z0, x0, z, xbc, dt = self.project(h)
        xbc = F.silu(cached_causal_conv(xbc, self.conv1d.weight, None, None if entry is None else entry.conv))
        x, bmat, cmat = torch.split(xbc, [self.d_ssm, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).transpose(1, 2)  # [B, nheads, N]
        g = -torch.exp(self.A_log.float())[None, :, None] * dt
        # The SSD scan is linear attention with q = C, k = B, v = dt*x, decay dt*A, unnormalised, scale 1.
        q, k, v = cmat.unsqueeze(1), bmat.unsqueeze(1), (x.unsqueeze(1) * dt[..., None]).to(x.dtype)
        op = functools.partial(power_attention, power="1", normalize=False, scale=1.0)
        if entry is None:
            y = op(q, k, v, g)
        else:
            y = op(q, k, v, g, initial_state=entry.state, output_final_state=True, inplace=True)[0]
        y = y.squeeze(1).to(h.dtype) + x * self.D.to(h.dtype)
        y = self.norm(y * F.silu(z))  # gated RMSNorm, the gate before the norm
        return self.out_proj(torch.cat([F.silu(z0) * x0, y.to(z0.dtype)], dim=-1))


# mamba_ssm.Mamba2's settings of the seed's `mamba` type (d_model, headdim = d_ssm = the head width, layer_idx per
# block); the pure-PyTorch Mamba2 above computes the same block
MAMBA_SSM_SETTINGS = dict(d_conv=2, expand=1, ngroups=1, A_init_range=(1, 16), D_has_hdim=True, rmsnorm=True,
                          norm_before_gate=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                          dt_limit=(0.0, float("inf")), bias=False, conv_bias=False, chunk_size=256)


def _mamba_ssm_class():
    try:
        from mamba_ssm import Mamba2 as CudaMamba2
    except ImportError:
        return None
    return CudaMamba2


def _has_causal_conv1d() -> bool:
    """mamba_ssm's fused training path (use_mem_eff_path) calls causal_conv1d's kernels, which mamba_ssm does not
    require: without them its unfused path (a PyTorch conv, the same SSD kernels) computes the same block."""
    try:
        import causal_conv1d  # noqa: F401
    except ImportError:
        return False
    return True


class MambaAttention(nn.Module):
    """The `mamba` type: Mamba-2 under the seed's name `mamba_layer`; mamba_ssm's block on CUDA when installed (its
    training kernels), else the pure-PyTorch Mamba2. Decoding runs Mamba2's recurrent form either way, on
    mamba_ssm's parameters where that block holds them: mamba_ssm's own one-token step does not take this
    setting's per-channel D (D_has_hdim; mamba_ssm 2.3.2 fails its shape check)."""

    def __init__(self, hidden_size: int, num_heads: int, layer_idx: int = 0):
        super().__init__()
        head_dim = hidden_size // num_heads
        self.layer_idx = layer_idx
        cuda_cls = _mamba_ssm_class()
        if cuda_cls is not None and torch.cuda.is_available():
            self.mamba_layer = cuda_cls(d_model=hidden_size, headdim=head_dim, d_ssm=head_dim, layer_idx=layer_idx,
                                        use_mem_eff_path=_has_causal_conv1d(), **MAMBA_SSM_SETTINGS)
        else:
            self.mamba_layer = Mamba2(hidden_size, head_dim)
        self.checkpoint_core = False

    def recurrent_block(self) -> Mamba2:
        """The pure-PyTorch block on this block's parameters: mamba_layer itself, or a Mamba2 sharing the
        Parameters of mamba_ssm's block (the same names), not registered, so the state dict stays one block's."""
        layer = self.mamba_layer
        if isinstance(layer, Mamba2):
            return layer
        with torch.device("meta"):
            block = Mamba2(layer.d_model, layer.d_ssm, layer.d_state, layer.d_conv)
        names = dict(layer.named_parameters())
        if set(names) != {name for name, _ in block.named_parameters()}:
            raise TypeError(f"mamba_ssm's Mamba2 has parameters {sorted(names)}, not those of the pure-PyTorch block")
        for name, param in names.items():
            module, _, attr = name.rpartition(".")
            setattr(block.get_submodule(module), attr, param)
        return block

    def new_cache(self, batch: int, device, dtype, capacity: int) -> RecurrentState:
        self.__dict__["_decoder"] = self.recurrent_block()  # the steps of this cache's decoding, sharing weights
        return self._decoder.new_cache(batch, device, dtype, capacity)

    def forward(self, h, cache=None, padding=None, residual=None):
        """As GenericAttention.forward (the residual added after the block)."""
        out = self._block(_zero_padding(h, padding), cache)  # zero inputs at left padding: with no biases before
        return out if residual is None else residual + out  # the SSM, they add exactly nothing to the state

    def _block(self, h, cache):
        if cache is None:
            return _maybe_checkpoint(self.checkpoint_core, self.mamba_layer, h)
        entry = cache.entry(self.layer_idx, self, h)
        decoder = self.__dict__.get("_decoder")  # set by new_cache; absent for a cache this instance did not make
        return (self.recurrent_block() if decoder is None else decoder)(h, entry)


def build_attention(attention_type: str, hidden_size: int, num_heads: int, layer_idx: int = 0) -> nn.Module:
    cfg = attention_config(attention_type)
    if cfg == "softmax":
        return SoftmaxAttention(hidden_size, num_heads, layer_idx)
    if cfg == "mamba":
        return MambaAttention(hidden_size, num_heads, layer_idx)
    return GenericAttention(hidden_size, num_heads, cfg, layer_idx)


class LlamaMLP(nn.Module):
    """SwiGLU (mlp_type "normal") or an ungated GELU MLP (mlp_type "gelu")."""

    def __init__(self, hidden_size: int, intermediate_size: int, mlp_type: str = "normal"):
        super().__init__()
        if mlp_type not in ("normal", "gelu"):
            raise ValueError(f"mlp_type must be 'normal' or 'gelu', got {mlp_type!r}")
        self.mlp_type = mlp_type
        if mlp_type == "normal":
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x, residual=None):
        """The MLP of x, plus residual when given (added in the down projection's kernel when decoding)."""
        if self.mlp_type == "normal":
            if _plain_unbiased(self.gate_proj, self.up_proj):
                h = swiglu(x, self.gate_proj.weight, self.up_proj.weight)
            else:
                h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(project_in(x, [self.up_proj])[0])
        return project_out(h, self.down_proj, residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden_size, intermediate_size, num_heads, attention_type, mlp_type="normal", eps=1e-5,
                 layer_idx: int = 0):
        super().__init__()
        self.self_attn = build_attention(attention_type, hidden_size, num_heads, layer_idx)
        self.mlp = LlamaMLP(hidden_size, intermediate_size, mlp_type)
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.checkpoint_mlp = False

    def forward(self, x, cache=None, padding=None):
        x = self.self_attn(self.input_layernorm(x), cache, padding, residual=x)
        return _maybe_checkpoint(self.checkpoint_mlp, self.mlp, self.post_attention_layernorm(x), x)
