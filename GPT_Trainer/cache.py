"""What the attention blocks keep between forward calls: plain cache data, one entry per layer.

Each block of GPT_Trainer/LlamaDecoderLayerClean.py allocates its own entry (`new_cache`) the first time
it runs with a cache and updates it in its own `forward` (docs/inference.md lists what each type keeps):
- `RecurrentState`: generic types of power 1 and 2 and Mamba-2 (its pure-PyTorch block's) — the state of
  kernel.power_attention ([B, H, D, dv + 1] float32: numerator and normaliser) and the last k-1 pre-conv
  rows of the causal conv; its size does not depend on the context length;
- `KVState`: softmax and the exp types (2Mamba-E, no finite state) — keys, values, the cumulative log
  decay in float64 (exp types with an A mask; differences of long sums stay exact), which slots hold
  tokens (not left padding) and the count of filled slots on the device, so that a one-token step has
  the same shapes at every position (a CUDA graph replays it).
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
    state: torch.Tensor  # [B, H, D, dv + 1] float32, kernel.power_attention's state (zero_state's layout)

    def nbytes(self) -> int:
        return _tensor_bytes(self.conv, self.state)


@dataclasses.dataclass
class KVState:
    """A KV cache whose buffers stay in place (unless `reserve` grows a cache made without max_length). A
    prompt (`append`) writes at slots the host knows; a one-token step (`step`) writes at the slot in
    `position`, a device tensor, and attends over all `capacity` slots with `valid` as the mask, so every
    step has the same shapes and a CUDA graph replays it at any position."""

    k: torch.Tensor  # [B, H, capacity, d]; slot i holds token i (left padding included)
    v: torch.Tensor  # [B, H, capacity, dv]
    a: torch.Tensor | None  # [B, H, capacity] float64 cumulative log decay (decayed exp types)
    a_last: torch.Tensor | None  # [B, H, 1] float64, a of the newest slot (0 when empty)
    valid: torch.Tensor  # [B, capacity] bool: slot holds a token (False at left padding and empty slots)
    position: torch.Tensor  # [1] long on the device: slots filled, the next token's slot and RoPE position
    conv: torch.Tensor | None  # [B, k-1, C]
    length: int = 0  # slots reserved, on the host (prompt slices, capacity checks; a step never reads it)

    @classmethod
    def empty(cls, batch, heads, d, dv, capacity, device, dtype, *, decayed: bool, conv=None):
        def zeros(*shape, dtype=dtype):
            return torch.zeros(*shape, device=device, dtype=dtype)

        a, a_last = (zeros(batch, heads, capacity, dtype=torch.float64), zeros(batch, heads, 1, dtype=torch.float64)) \
            if decayed else (None, None)
        return cls(zeros(batch, heads, capacity, d), zeros(batch, heads, capacity, dv), a, a_last,
                   zeros(batch, capacity, dtype=torch.bool), zeros(1, dtype=torch.long), conv)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, n: int, grow: bool):
        """Count n new tokens on the host before they are written (by `append` or `step`, or by a CUDA-graph
        replay of `step`). When they do not fit: double the capacity as needed when `grow` (a cache made
        without max_length), else raise."""
        end = self.length + n
        if end > self.capacity:
            if not grow:
                raise ValueError(f"the KV cache holds {self.capacity} tokens and {self.length} are filled, no room for "
                                 f"{n} more; make it with model.new_cache(max_length) of at least prompt + new tokens")
            capacity = max(end, 2 * self.capacity)

            def grown(t, dim):
                shape = list(t.shape)
                shape[dim] = capacity - shape[dim]
                return torch.cat([t, t.new_zeros(shape)], dim=dim)

            self.k, self.v, self.valid = grown(self.k, 2), grown(self.v, 2), grown(self.valid, 1)
            if self.a is not None:
                self.a = grown(self.a, 2)
        self.length = end

    def positions(self, n: int) -> torch.Tensor:
        """Slots (and RoPE positions) of n new tokens, from the device count (a step's is `position` itself)."""
        return self.position if n == 1 else self.position + torch.arange(n, device=self.position.device)

    def append(self, k, v, a=None, valid=None):
        """Write the n reserved tokens (a: their cumulative log decay, valid [B, n]: False at padding); returns
        (k, v, a, valid) over the filled slots."""
        start, end = self.length - k.shape[2], self.length
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        if a is not None:
            self.a[:, :, start:end] = a
            self.a_last.copy_(a[:, :, -1:])
        self.valid[:, start:end] = True if valid is None else valid
        self.position.fill_(end)
        return (self.k[:, :, :end], self.v[:, :, :end], None if a is None else self.a[:, :, :end],
                self.valid[:, :end])

    def step(self, k, v, a=None):
        """Write one token at `position` (no host value is read: the same kernels at every position); returns
        (k, v, a) over all capacity slots, of which `valid` marks those to attend to."""
        self.k.index_copy_(2, self.position, k.to(self.k.dtype))  # as the prompt's slice assignment casts
        self.v.index_copy_(2, self.position, v.to(self.v.dtype))
        if a is not None:
            self.a.index_copy_(2, self.position, a)
            self.a_last.copy_(a)
        self.valid.index_fill_(1, self.position, True)
        self.position.add_(1)
        return self.k, self.v, self.a

    def nbytes(self) -> int:
        """Bytes of the per-head state of the filled slots (keys, values, decays: the paper's 2·N·d), and the conv
        rows; the capacity reserved for tokens to come and the per-token mask are not counted."""
        filled = self.length / self.capacity
        return _tensor_bytes(self.conv) + round(filled * _tensor_bytes(self.k, self.v, self.a))


class TwoMambaCache(Cache):
    """The per-layer entries of one batch of sequences, as `past_key_values` of TwoMambaForCausalLM.

    max_length: slots a KV cache allocates up front (generate passes prompt + new tokens); its buffers then
    stay where they are (a CUDA graph may be captured on them) and a token beyond max_length raises. Without
    max_length a KV cache grows as needed. Beam search and cropping are not supported (recurrent states cannot be rolled back).
    """

    def __init__(self, num_layers: int, max_length: int | None = None):
        super().__init__(layers=[None] * num_layers)
        self.max_length = max_length
        self.seen_tokens = 0
        self.step_graph = None  # GPT_Trainer.cuda_graph.GraphStep when one-token steps replay a CUDA graph

    def entry(self, layer_idx: int, block, h: torch.Tensor):
        """Layer `layer_idx`'s entry, allocated by `block.new_cache` on first use (h: the block's input)."""
        if self.layers[layer_idx] is None:
            self.layers[layer_idx] = block.new_cache(h.shape[0], h.device, h.dtype, self.max_length or h.shape[1])
        entry = self.layers[layer_idx]
        if isinstance(entry, KVState):
            entry.reserve(h.shape[1], grow=self.max_length is None)
        return entry

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
