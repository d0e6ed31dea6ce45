"""One-token decoding steps of TwoMambaForCausalLM replayed from a CUDA graph (CUDA only).

A one-token step is the same kernels on the same buffers every time, so it is captured once and replayed:
no Python and no kernel-launch overhead per layer. That holds for every cache entry: the fixed-size
states of the recurrent types (power 1 and 2, mamba), and the KV caches of softmax and the exp types,
allocated at the cache's max_length, whose step writes at and reads the slot count from the device and
attends over all slots under a mask (`KVState.step`). The entries are allocated before the prompt
(static buffers; prefill writes into them in place), the step is captured on them, and the forward of
the model replays the graph for every one-token step on that cache. Only `generate` on a CUDA device
uses this (set `model.decode_with_cuda_graph = False` to step eagerly); the CPU never does, but runs the
same step eagerly. Tested on GPUs only (tests/test_infer.py, marked gpu).
"""
from __future__ import annotations

import torch

from GPT_Trainer.cache import KVState, TwoMambaCache


def _clear(cache: TwoMambaCache):
    """Every entry back to an empty context (after steps on no prompt: warm-up and capture)."""
    for entry in cache.layers:
        for value in vars(entry).values():
            if isinstance(value, torch.Tensor):
                value.zero_()
        if isinstance(entry, KVState):
            entry.length = 0


class GraphStep:
    """The captured step: the model's decoder stack and lm_head over `batch` tokens on `cache`'s entries."""

    def __init__(self, model, cache: TwoMambaCache, batch: int):
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.kv_entries = [entry for entry in cache.layers if isinstance(entry, KVState)]

        def step():
            return model.lm_head(model.model(self.tokens, cache))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture: lazy initialisation, Triton compilation
                step()
                _clear(cache)  # a KV step writes at the device's slot count: keep it inside the capacity
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()
        _clear(cache)

    @classmethod
    @torch.no_grad()
    def capture_if_supported(cls, model, cache: TwoMambaCache, batch: int) -> GraphStep | None:
        """Allocate every layer's entry in `cache` and capture the step; None (and an untouched cache) when a
        layer keeps a KV cache and the cache has no max_length (its buffers would grow)."""
        capacity = cache.max_length or 1
        entries = [layer.self_attn.new_cache(batch, model.device, model.dtype, capacity) for layer in model.model.layers]
        if cache.max_length is None and any(isinstance(entry, KVState) for entry in entries):
            return None
        cache.layers = entries
        return cls(model, cache, batch)

    def replay(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] of one step on the captured cache."""
        if input_ids.shape != self.tokens.shape:
            raise ValueError(f"the captured step takes input_ids of shape {tuple(self.tokens.shape)}, got {tuple(input_ids.shape)}")
        for entry in self.kv_entries:  # the host count the eager step keeps in TwoMambaCache.entry
            entry.reserve(1, grow=False)
        self.tokens.copy_(input_ids)
        self.graph.replay()
        return self.logits.clone()
