"""What the benchmarks change in the model to time other cases (no GPU needed for these)."""
import torch

import GPT_Trainer.LlamaDecoderLayerClean as block_module
from bench.train_throughput import TYPES, pytorch_mamba, scaled_decays
from GPT_Trainer.LlamaDecoderLayerClean import GenericAttention, Mamba2, build_attention


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


def test_mamba_torch_builds_the_pytorch_block_where_mamba_ssm_would_be_taken(monkeypatch):
    """"mamba-torch" (pytorch_mamba) builds the pure-PyTorch Mamba-2 block even where the model would take
    mamba_ssm's: here a machine with mamba_ssm and a GPU, each stood in for by the two calls the model asks."""

    class MambaSSMBlock(torch.nn.Module):
        def __init__(self, **settings):
            super().__init__()

    monkeypatch.setattr(block_module, "_mamba_ssm_class", lambda: MambaSSMBlock)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(build_attention("mamba", 64, 2, 0).mamba_layer, MambaSSMBlock)
    with pytorch_mamba():
        assert isinstance(build_attention("mamba", 64, 2, 0).mamba_layer, Mamba2)
    assert isinstance(build_attention("mamba", 64, 2, 0).mamba_layer, MambaSSMBlock)
