"""One-token decoding steps of TwoMambaForCausalLM replayed from a CUDA graph (CUDA only).

A step of a model whose every layer keeps a fixed-size cache (the recurrent types: power 1 and 2,
mamba) is the same kernels on the same buffers every time, so it is captured once and replayed: no
Python and no kernel-launch overhead per layer. The cache entries are allocated before the prompt
(static buffers; prefill writes into them in place), the step is captured on them, and the forward of
the model replays the graph for every one-token step on that cache. KV caches (softmax, exp types) grow
with the context, so those models step eagerly. Only `generate` on a CUDA device uses this (set
`model.decode_with_cuda_graph = False` to step eagerly); the CPU never does. Tested on GPUs only
(tests/test_infer.py, marked gpu).
"""
from __future__ import annotations

import torch

from GPT_Trainer.cache import KVState, MambaSSMState, TwoMambaCache


class GraphStep:
    """The captured step: the model's decoder stack and lm_head over `batch` tokens on `cache`'s entries."""

    def __init__(self, model, cache: TwoMambaCache, batch: int):
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)

        def step():
            return model.lm_head(model.model(self.tokens, cache))

        for entry in cache.layers:  # capture the step of mamba_ssm, not its prompt path
            if isinstance(entry, MambaSSMState):
                entry.started = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture: lazy initialisation, Triton compilation
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()
        for entry in cache.layers:  # back to an empty context
            for value in vars(entry).values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
            if isinstance(entry, MambaSSMState):
                entry.started = False

    @classmethod
    @torch.no_grad()
    def capture_if_supported(cls, model, cache: TwoMambaCache, batch: int) -> GraphStep | None:
        """Allocate every layer's entry in `cache` and capture the step; None (and an untouched cache) when a
        layer keeps a KV cache."""
        entries = [layer.self_attn.new_cache(batch, model.device, model.dtype, 1) for layer in model.model.layers]
        if any(isinstance(entry, KVState) for entry in entries):
            return None
        cache.layers = entries
        return cls(model, cache, batch)

    def replay(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] of one step on the captured cache."""
        if input_ids.shape != self.tokens.shape:
            raise ValueError(f"the captured step takes input_ids of shape {tuple(self.tokens.shape)}, got {tuple(input_ids.shape)}")
        self.tokens.copy_(input_ids)
        self.graph.replay()
        return self.logits.clone()
