"""Cached decoding state for every attention type, and prefill / one-token step passes through a model.

What each attention module keeps between tokens (SPEC section 5):
- generic types of power 1 and 2, and the pure-PyTorch Mamba-2: a `RecurrentState` of fixed size — the
  numerator S [B, H, D, d] = sum_j e^{a_t - a_j} phi(k_j) v_j^T, the denominator z [B, H, D] (sm_norm
  only) and the last k-1 pre-conv input rows; phi is the symmetric second-order map (D = d(d+1)/2) for
  power 2 and the identity for power 1 and Mamba-2;
- softmax and the exp types (2Mamba-E): a `KVCache` of keys, values and (decayed types) the cumulative
  log decay a, plus the conv rows;
- mamba_ssm's Mamba2 (CUDA): its own conv and SSM states, advanced by its own `step`.

Prompts are consumed in chunks: inside a chunk the weights are formed in parallel, across chunks only the
state travels, so prefill memory is linear in the prompt length and a one-token step is the same code
with a chunk of one token, costing O(D d) whatever the context length.

Batches of prompts of different lengths are right-aligned: each group of equal-length prompts is
prefilled on its own at a slot offset so that all end at the same slot, then the states are concatenated.
Recurrent states ignore the offset; KV caches mark the slots before it as padding, and for softmax the
slot index is the RoPE position, which leaves every query-key distance, hence every score, unchanged.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from GPT_Trainer.LlamaDecoderLayerClean import GenericAttention, Mamba2, MambaAttention, SoftmaxAttention
from kernel import causal_conv1d
from kernel.kron import kron_reference
from kernel.reference import attention_weights

DEFAULT_CHUNK_SIZE = 512


class _State:
    """Per-layer cache: a dataclass whose tensor fields share the batch as their first dimension."""

    def state_tensors(self) -> list[torch.Tensor]:
        """The state proper: every tensor but the per-sequence padding count of KV caches."""
        return [t for t in (getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pad")
                if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        """Bytes held by the state tensors (allocated capacity included)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    @classmethod
    def cat(cls, states):
        """Concatenate the states of several prompt groups along the batch."""
        if len(states) == 1:
            return states[0]
        values = {}
        for field in dataclasses.fields(cls):
            items = [getattr(s, field.name) for s in states]
            if isinstance(items[0], torch.Tensor):
                values[field.name] = torch.cat(items)
            elif any(item != items[0] for item in items):
                raise ValueError(f"cannot batch states with different {field.name}: {items}")
            else:
                values[field.name] = items[0]
        return cls(**values)


@dataclasses.dataclass
class RecurrentState(_State):
    S: torch.Tensor  # [B, H, D, dv] float32
    z: torch.Tensor | None  # [B, H, D] float32, sm_norm only
    conv: torch.Tensor | None  # [B, k-1, C] last pre-conv rows


@dataclasses.dataclass
class KVCache(_State):
    k: torch.Tensor  # [B, H, capacity, d]; slot index = position
    v: torch.Tensor
    a: torch.Tensor | None  # [B, H, capacity] float32 cumulative log decay (decayed exp types)
    conv: torch.Tensor | None
    pad: torch.Tensor  # [B] slots before the sequence starts
    length: int  # slots filled (the same for the whole batch: sequences are right-aligned)

    def append(self, k, v, a=None):
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            self.reserve(self.length + n - self.k.shape[2])
        end = self.length + n
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        if a is not None:
            self.a[:, :, self.length:end] = a
        self.length = end

    def reserve(self, extra: int):
        """Grow the capacity by `extra` slots now, so that appending them copies nothing."""
        def grow(t):
            return None if t is None else torch.cat([t, t.new_zeros(*t.shape[:2], extra, *t.shape[3:])], dim=2)

        self.k, self.v, self.a = grow(self.k), grow(self.v), grow(self.a)

    def attend(self, q, *, normalize: bool, scale: float | None):
        """Output of the single newest query q [B, H, 1, d] over the filled slots.

        Weights exp(scale q.k_j + a_i - a_j) over valid slots, divided by their sum when `normalize`
        (softmax, sm_norm); a is absent for softmax and undecayed types.
        """
        n = self.length
        k, v = self.k[:, :, :n], self.v[:, :, :n]
        valid = torch.arange(n, device=k.device)[None, :] >= self.pad[:, None]  # [B, n]
        bias = None
        if self.a is not None:
            a = self.a[:, :, :n]
            bias = (a[..., -1:] - a).unsqueeze(2)  # [B, H, 1, n]
        if not normalize:
            scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * (scale or q.shape[-1] ** -0.5)
            scores = scores + (0 if bias is None else bias)
            return (torch.exp(scores.masked_fill(~valid[:, None, None], float("-inf"))) @ v.float()).to(q.dtype)
        if bias is not None:
            mask = bias.masked_fill(~valid[:, None, None], float("-inf")).to(q.dtype)
        else:  # None lets SDPA pick its fastest kernel when nothing is padded
            mask = valid[:, None, None] if bool((self.pad > 0).any()) else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@dataclasses.dataclass
class MambaSSMState(_State):
    conv: torch.Tensor  # [B, C, W], stored channel-last as mamba_ssm allocates it
    ssm: torch.Tensor  # [B, nheads, headdim, d_state]

    @classmethod
    def cat(cls, states):
        if len(states) == 1:
            return states[0]
        conv = torch.cat([s.conv.transpose(1, 2) for s in states]).transpose(1, 2)  # keep the memory layout
        return cls(conv, torch.cat([s.ssm for s in states]))


def conv_with_cache(x, cache, weight, bias=None):
    """Causal depthwise conv of new rows x [B, T, C] that continue after the cached rows [B, k-1, C].

    A zero cache is the conv's zero padding, so a prompt starting from zeros gets the plain conv.
    Returns (y [B, T, C], the new cache).
    """
    window = torch.cat([cache, x], dim=1)
    y = causal_conv1d(window, weight, bias)[:, cache.shape[1]:]
    # a copy: a view would keep the whole window (all prompt rows) alive with the cache
    return y, window[:, window.shape[1] - cache.shape[1]:].clone()


def feature_map(x, power: str):
    return kron_reference(x) if power == "2" else x


def recurrent_chunk(q, k, v, g, state: RecurrentState, *, power: str, scale: float):
    """Outputs of one chunk q, k [B,H,C,dk], v [B,H,C,dv], log decay g [B,H,C] (or None), updating
    state.S / state.z in place; normalised by the row sum when the state has z (zero sum -> 0)."""
    q, k, v = q.float(), k.float(), v.float()
    g = torch.zeros(q.shape[:3], device=q.device) if g is None else g.float()
    a = g.cumsum(-1)  # log decay from the chunk start to each token
    w, _ = attention_weights(q, k, g, power=power, scale=scale)  # within the chunk, decayed, causal
    phi_q = feature_map(q * scale, power)  # phi(c x) = c^p phi(x): the scale folded into q
    phi_k = feature_map(k, power)
    decay_in = a.exp()[..., None]
    decay_out = (a[..., -1:] - a).exp()[..., None]  # from each token to the chunk end
    decay_all = a[..., -1, None, None].exp()
    num = decay_in * (phi_q @ state.S) + w @ v
    state.S = decay_all * state.S + (phi_k * decay_out).transpose(-1, -2) @ v
    if state.z is None:
        return num
    den = decay_in * (phi_q @ state.z[..., None]) + w.sum(-1, keepdim=True)
    state.z = decay_all[..., 0] * state.z + (phi_k * decay_out).sum(-2)
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))


def recurrent_core(q, k, v, g, state: RecurrentState, *, power: str, scale: float, chunk_size: int):
    outs = []
    for start in range(0, q.shape[2], chunk_size):
        part = slice(start, start + chunk_size)
        outs.append(recurrent_chunk(q[:, :, part], k[:, :, part], v[:, :, part], None if g is None else g[..., part],
                                    state, power=power, scale=scale))
    return torch.cat(outs, dim=2)


def _generic_inputs(attn: GenericAttention, h, conv_cache):
    """q, k, v, g, D residual, Z gate of new tokens h and the new conv cache (forward steps 1-9)."""
    qkv = attn.qkv_proj(h)
    if conv_cache is not None:
        qkv, conv_cache = conv_with_cache(qkv, conv_cache, attn.conv1d.weight, attn.conv1d.bias)
    return attn.project(h, qkv), conv_cache


def _zero_conv_cache(attn: GenericAttention, h):
    if not attn.cfg.use_in_conv:
        return None
    return h.new_zeros(h.shape[0], attn.cfg.in_conv_dim - 1, attn.conv1d.in_channels)


class LinearStateDecoder:
    """Generic types of power 1 and 2: the recurrence of SPEC section 5."""

    def __init__(self, attn: GenericAttention, chunk_size: int):
        self.attn, self.chunk_size = attn, chunk_size
        d = attn.head_dim
        self.features = d * (d + 1) // 2 if attn.cfg.power == "2" else d

    def new_state(self, h) -> RecurrentState:
        b, heads, d = h.shape[0], self.attn.num_heads, self.attn.head_dim
        S = torch.zeros(b, heads, self.features, d, device=h.device)
        z = torch.zeros(b, heads, self.features, device=h.device) if self.attn.cfg.norm_type == "sm_norm" else None
        return RecurrentState(S, z, _zero_conv_cache(self.attn, h))

    def step(self, h, state: RecurrentState):
        (q, k, v, g, d_res, z), state.conv = _generic_inputs(self.attn, h, state.conv)
        o = recurrent_core(q, k, v, g, state, power=self.attn.cfg.power, scale=self.attn.head_dim ** -0.5,
                           chunk_size=self.chunk_size)
        return self.attn.finish(o.to(h.dtype), d_res, z)

    def prefill(self, h, offset: int):
        state = self.new_state(h)
        return self.step(h, state), state


class MambaStateDecoder:
    """The pure-PyTorch Mamba-2: its SSD scan is the power-1 recurrence with q = C, k = B, v = dt x, scale 1."""

    def __init__(self, layer: Mamba2, chunk_size: int):
        self.layer, self.chunk_size = layer, chunk_size

    def step(self, h, state: RecurrentState):
        m = self.layer
        z0, x0, z, xbc, dt = m.split(m.in_proj(h))
        xbc, state.conv = conv_with_cache(xbc, state.conv, m.conv1d.weight)
        x, bmat, cmat, g, dt = m.ssm_inputs(F.silu(xbc), dt)
        y = recurrent_core(cmat, bmat, x * dt[..., None].to(x.dtype), g, state, power="1", scale=1.0,
                           chunk_size=self.chunk_size)
        return m.output(y.squeeze(1).to(h.dtype), x.squeeze(1), z, z0, x0)

    def prefill(self, h, offset: int):
        m = self.layer
        S = torch.zeros(h.shape[0], m.nheads, m.d_state, m.d_ssm, device=h.device)
        state = RecurrentState(S, None, h.new_zeros(h.shape[0], m.conv1d.kernel_size[0] - 1, m.conv1d.in_channels))
        return self.step(h, state), state


def _prompt_cache(h, heads, d, offset, decayed, conv):
    """An empty cache sized for the prompt h [B, N, .] after `offset` padding slots."""
    b, capacity = h.shape[0], offset + h.shape[1]
    k = h.new_zeros(b, heads, capacity, d)
    a = torch.zeros(b, heads, capacity, device=h.device) if decayed else None
    pad = torch.full((b,), offset, dtype=torch.long, device=h.device)
    return KVCache(k, torch.zeros_like(k), a, conv, pad, offset)


class SoftmaxDecoder:
    def __init__(self, attn: SoftmaxAttention):
        self.attn = attn

    def prefill(self, h, offset: int):
        q, k, v = self.attn.project(h, offset)
        cache = _prompt_cache(h, self.attn.num_heads, self.attn.head_dim, offset, False, None)
        cache.append(k, v)
        return self.attn.finish(self.attn.core(q, k, v)), cache

    def step(self, h, cache: KVCache):
        q, k, v = self.attn.project(h, cache.length)
        cache.append(k, v)
        return self.attn.finish(cache.attend(q, normalize=True, scale=None))


class ExpDecoder:
    """Exp types (2Mamba-E): softmax-like weights with a decay bias; their state grows with the context."""

    def __init__(self, attn: GenericAttention):
        self.attn = attn

    def prefill(self, h, offset: int):
        attn = self.attn
        (q, k, v, g, d_res, z), conv = _generic_inputs(attn, h, _zero_conv_cache(attn, h))
        cache = _prompt_cache(h, attn.num_heads, attn.head_dim, offset, g is not None, conv)
        cache.append(k, v, None if g is None else g.float().cumsum(-1))
        return attn.finish(attn.core(q, k, v, g).to(h.dtype), d_res, z), cache

    def step(self, h, cache: KVCache):
        attn = self.attn
        (q, k, v, g, d_res, z), cache.conv = _generic_inputs(attn, h, cache.conv)
        cache.append(k, v, None if g is None else cache.a[:, :, cache.length - 1:cache.length] + g.float())
        o = cache.attend(q, normalize=attn.cfg.norm_type == "sm_norm", scale=None)
        return attn.finish(o.to(h.dtype), d_res, z)


class MambaSSMDecoder:
    """mamba_ssm's Mamba2 (CUDA): its forward fills its inference cache, its `step` advances it."""

    def __init__(self, layer):
        self.layer = layer

    def prefill(self, h, offset: int):
        from mamba_ssm.utils.generation import InferenceParams

        if self.layer.layer_idx is None:  # mamba_ssm keys its cache by layer index
            self.layer.layer_idx = 0
        params = InferenceParams(max_seqlen=h.shape[1] + 1, max_batch_size=h.shape[0])
        out = self.layer(h, inference_params=params)
        conv, ssm = params.key_value_memory_dict[self.layer.layer_idx]
        return out, MambaSSMState(conv, ssm)

    def step(self, h, state: MambaSSMState):
        out, state.conv, state.ssm = self.layer.step(h, state.conv, state.ssm)
        return out


def layer_decoder(attn, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The decoder of one attention module (the single dispatch on the attention type)."""
    if isinstance(attn, SoftmaxAttention):
        return SoftmaxDecoder(attn)
    if isinstance(attn, MambaAttention):
        if isinstance(attn.mamba_layer, Mamba2):
            return MambaStateDecoder(attn.mamba_layer, chunk_size)
        return MambaSSMDecoder(attn.mamba_layer)
    if isinstance(attn, GenericAttention):
        return ExpDecoder(attn) if attn.cfg.power == "exp" else LinearStateDecoder(attn, chunk_size)
    raise TypeError(f"no cached decoding for attention module {type(attn).__name__}")


class ModelDecoder:
    """Prefill and one-token steps of a TwoMambaForCausalLM with per-layer caches."""

    def __init__(self, model, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.decoders = [layer_decoder(layer.self_attn, chunk_size) for layer in model.model.layers]

    def _run(self, ids, attend):
        """The decoder stack of LlamaDecoderLayer with `attend(i, h)` as layer i's attention; last-token logits."""
        x = self.model.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.model.layers):
            x = x + attend(i, layer.input_layernorm(x))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.model.model.norm(x[:, -1]))

    @torch.no_grad()
    def prefill(self, ids, offset: int = 0):
        """ids [B, N] (equal lengths) -> (next-token logits [B, V], per-layer states).

        offset: empty slots before the prompt in KV caches (right-aligns it with longer prompts)."""
        states = [None] * len(self.decoders)

        def attend(i, h):
            out, states[i] = self.decoders[i].prefill(h, offset)
            return out

        return self._run(ids, attend), states

    @torch.no_grad()
    def step(self, tokens, states):
        """tokens [B] -> next-token logits [B, V]; the states advance in place."""
        return self._run(tokens[:, None], lambda i, h: self.decoders[i].step(h, states[i]))


def cat_states(groups):
    """Per-layer states of several prompt groups (each a list over layers) -> one batched list."""
    return [type(layer[0]).cat(layer) for layer in zip(*groups)]


def reserve(states, extra: int):
    """Make room for `extra` more tokens in every KV cache (recurrent states never grow)."""
    for state in states:
        if isinstance(state, KVCache):
            state.reserve(extra)


def state_nbytes(states) -> int:
    return sum(state.nbytes() for state in states)
