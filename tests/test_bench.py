"""What the benchmarks change in the model to time other cases (no GPU needed for these)."""
import torch

from bench.train_throughput import TYPES, scaled_decays
from GPT_Trainer.LlamaDecoderLayerClean import GenericAttention, build_attention


def test_decay_scale_multiplies_the_decay_and_nothing_else(monkeypatch):
    """--decay_scale S: the block's log decay g comes out S times, q, k, v and the rest unchanged."""
    monkeypatch.setattr(GenericAttention, "project", GenericAttention.project)  # put back after the test
    block = build_attention(TYPES["2mamba-e"], 64, 2, 0)
    qkv, side = block.projections(torch.randn(2, 5, 64))
    before = block.project(qkv, side)
    scaled_decays(0.001)
    after = block.project(qkv, side)
    g, g_scaled = before[3], after[3]
    assert (g < 0).all() and torch.allclose(g_scaled, 0.001 * g, rtol=1e-6, atol=0)
    for x, y in zip(before[:3] + before[4:], after[:3] + after[4:]):
        assert (x is None and y is None) or torch.equal(x, y)
