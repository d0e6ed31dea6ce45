"""Small builders shared by several test modules."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from GPT_Trainer.data import load_tokenizer
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA
from GPT_Trainer.modeling import get_model


def tiny_two_layer_model(max_len: int, attention_type: str = TWO_MAMBA):
    """(a randomly initialised 2-layer tiny model, the built-in tokenizer), seeded."""
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    model = get_model("tiny", max_len, len(tokenizer), attention_type)
    model.config.num_hidden_layers = 2
    model.model.layers = model.model.layers[:2]
    return model, tokenizer


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in norm, in float64 (0 / 0 counts as 0)."""
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


class CountOps(TorchDispatchMode):
    """Counts the aten calls, inside the `with`, for which counts(func, args) is true (autograd's backward
    included)."""

    def __init__(self, counts):
        super().__init__()
        self.counts, self.calls = counts, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += bool(self.counts(func, args))
        return func(*args, **(kwargs or {}))
