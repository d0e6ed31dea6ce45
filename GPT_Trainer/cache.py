"""What the attention blocks keep between forward calls: plain cache data, one entry per layer.

Each block of GPT_Trainer/LlamaDecoderLayerClean.py allocates its own entry (`new_cache`) the first time
it runs with a cache and updates it in its own `forward` (docs/inference.md lists what each type keeps):
- `RecurrentState`: generic types of power 1 and 2 and the pure-PyTorch Mamba-2 — the state of
  kernel.power_attention ([B, H, D, dv + 1] float32: numerator and normaliser) and the last k-1 pre-conv
  rows of the causal conv; its size does not depend on the context length;
- `KVState`: softmax and the exp types (2Mamba-E, no finite state) — keys, values, the cumulative log
  decay in float64 (exp types with an A mask; differences of long sums stay exact) and which slots hold
  left padding;
- `MambaSSMState`: mamba_ssm's own conv and SSM states (CUDA), advanced by its `step`.
`TwoMambaCache` holds the entries and the count of tokens seen; it is what the model's forward takes and
returns as `past_key_values`.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclasses.dataclass
class RecurrentState:
    conv: torch.Tensor | None  # [B, k-1, C] last pre-conv rows (None without a conv)
    state: torch.Tensor  # [B, H, D, dv + 1] float32, kernel.power_attention's state

    def nbytes(self) -> int:
        return _tensor_bytes(self.conv, self.state)


@dataclasses.dataclass
class KVState:
    k: torch.Tensor  # [B, H, capacity, d]; slot i holds token i (left padding included)
    v: torch.Tensor  # [B, H, capacity, dv]
    a: torch.Tensor | None  # [B, H, capacity] float64 cumulative log decay (decayed exp types)
    valid: torch.Tensor | None  # [B, capacity] bool, False at left padding; None while nothing is padding
    conv: torch.Tensor | None  # [B, k-1, C]
    length: int = 0  # slots filled

    @classmethod
    def empty(cls, batch, heads, d, dv, capacity, device, dtype, *, decayed: bool, conv=None):
        k = torch.zeros(batch, heads, capacity, d, device=device, dtype=dtype)
        v = torch.zeros(batch, heads, capacity, dv, device=device, dtype=dtype)
        a = torch.zeros(batch, heads, capacity, device=device, dtype=torch.float64) if decayed else None
        return cls(k, v, a, None, conv)

    def last_a(self):
        """Cumulative log decay of the newest slot ([B, H, 1] float64), 0 when empty."""
        return self.a[:, :, self.length - 1:self.length] if self.length else 0.0

    def append(self, k, v, a=None, valid=None):
        """Write n new tokens; returns (k, v, a, valid) over all filled slots (valid None: no padding)."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            self._grow(max(end, 2 * self.k.shape[2]))
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        if a is not None:
            self.a[:, :, self.length:end] = a
        if valid is not None and self.valid is None:
            self.valid = torch.ones(self.k.shape[0], self.k.shape[2], dtype=torch.bool, device=k.device)
        if self.valid is not None:
            self.valid[:, self.length:end] = True if valid is None else valid
        self.length = end
        return (self.k[:, :, :end], self.v[:, :, :end], None if self.a is None else self.a[:, :, :end],
                None if self.valid is None else self.valid[:, :end])

    def _grow(self, capacity: int):
        def grow(t, dim):
            if t is None:
                return None
            shape = list(t.shape)
            shape[dim] = capacity - shape[dim]
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        self.k, self.v, self.a = grow(self.k, 2), grow(self.v, 2), grow(self.a, 2)
        self.valid = grow(self.valid, 1)

    def nbytes(self) -> int:
        """Bytes of the filled slots (the capacity reserved for tokens to come is not counted)."""
        filled = self.length / self.k.shape[2]
        return _tensor_bytes(self.conv) + round(filled * _tensor_bytes(self.k, self.v, self.a, self.valid))


@dataclasses.dataclass
class MambaSSMState:
    conv: torch.Tensor  # mamba_ssm's conv state [B, C, W]
    ssm: torch.Tensor  # [B, nheads, headdim, d_state]
    started: bool = False

    def nbytes(self) -> int:
        return _tensor_bytes(self.conv, self.ssm)


class TwoMambaCache(Cache):
    """The per-layer entries of one batch of sequences, as `past_key_values` of TwoMambaForCausalLM.

    max_length: slots a KV cache allocates up front (generate passes prompt + new tokens); it grows when
    exceeded. Beam search and cropping are not supported (recurrent states cannot be rolled back).
    """

    def __init__(self, num_layers: int, max_length: int | None = None):
        super().__init__(layers=[None] * num_layers)
        self.max_length = max_length
        self.seen_tokens = 0
        self.step_graph = None  # GPT_Trainer.cuda_graph.GraphStep when one-token steps replay a CUDA graph

    def entry(self, layer_idx: int, block, h: torch.Tensor):
        """Layer `layer_idx`'s entry, allocated by `block.new_cache` on first use (h: the block's input)."""
        if self.layers[layer_idx] is None:
            self.layers[layer_idx] = block.new_cache(h.shape[0], h.device, h.dtype, max(self.max_length or 0, h.shape[1]))
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        sizes = {next(t for t in vars(e).values() if isinstance(t, torch.Tensor)).shape[0]
                 for e in self.layers if e is not None}
        return sizes.pop() if sizes else -1

    @property
    def is_compileable(self) -> bool:
        return False  # one-token steps are captured by GPT_Trainer/cuda_graph.py, not torch.compile

    @property
    def is_croppable(self) -> bool:
        return False

    def nbytes(self) -> int:
        """Bytes of every layer's cache (of a KV cache: its filled slots)."""
        return sum(e.nbytes() for e in self.layers if e is not None)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("TwoMambaCache supports greedy decoding and sampling only (no beam search, "
                                  "no cropping: recurrent states cannot be rolled back)")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported
    activate_past_recording = _unsupported

    def reset(self):
        self.layers = [None] * len(self.layers)
        self.seen_tokens = 0
        self.step_graph = None
