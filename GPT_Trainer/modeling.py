"""Llama-2 causal LM with pluggable attention; state-dict keys equal transformers.LlamaForCausalLM's.

`get_model` builds a fresh model of a named size, `load_model` loads a checkpoint directory in the seed's
layout (config.json and/or config.pt, model.safetensors) without unpickling any object.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, LlamaDecoderLayer, RMSNorm, attention_config


class TwoMambaConfig(LlamaConfig):
    """A LlamaConfig that also carries the attention type (and the MLP type); model_type stays "llama",
    so config.json files interchange with the seed's LlamaConfig.save_pretrained output."""

    attention_type: str = TWO_MAMBA
    mlp_type: str = "normal"


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int


MODEL_SIZES = {
    "tiny": ModelSize(128, 256, 4, 4),
    "small": ModelSize(1024, 2048, 16, 20),
    "medium": ModelSize(1536, 3072, 24, 27),
    "medium_wide": ModelSize(1536, 3072, 24, 20),
    "large": ModelSize(3072, 6144, 16, 20),
    "large_depth": ModelSize(1024, 2048, 32, 60),
}


class TwoMambaModel(nn.Module):
    def __init__(self, config: TwoMambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                config.hidden_size, config.intermediate_size, config.num_attention_heads, config.attention_type,
                config.mlp_type, config.rms_norm_eps,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TwoMambaForCausalLM(PreTrainedModel):
    config_class = TwoMambaConfig
    base_model_prefix = "model"
    _keys_to_ignore_on_load_unexpected = [r"self_attn\.attn_mask$"]
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: TwoMambaConfig):
        attention_config(config.attention_type)  # fail early, listing the valid names
        super().__init__(config)
        self.model = TwoMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
        elif hasattr(module, "reset_special_parameters"):
            module.reset_special_parameters()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_activation_checkpointing(self, enabled: bool = True):
        """Recompute the attention core and the MLP in the backward pass (the seed's memory saving)."""
        for layer in self.model.layers:
            layer.self_attn.checkpoint_core = enabled
            layer.checkpoint_mlp = enabled
        return self

    def forward(self, input_ids, labels=None, **unused):
        """labels follow the Hugging Face convention (shifted inside; -100 is ignored)."""
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)


def make_config(model_size: str, model_max_length: int, vocab_size: int, attention_type: str,
                mlp_type: str = "normal", **overrides) -> TwoMambaConfig:
    if model_size not in MODEL_SIZES:
        raise ValueError(f"unknown model_size {model_size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    attention_config(attention_type)
    size = MODEL_SIZES[model_size]
    return TwoMambaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_attention_heads=size.num_attention_heads, num_key_value_heads=size.num_attention_heads,
        num_hidden_layers=size.num_hidden_layers, max_position_embeddings=model_max_length,
        rms_norm_eps=1e-5, initializer_range=0.02, hidden_act="silu", attention_bias=False,
        tie_word_embeddings=False, attention_type=attention_type, mlp_type=mlp_type, **overrides,
    )


def get_model(model_size: str, model_max_length: int, vocab_size: int, attention_type: str,
              mlp_type: str = "normal") -> TwoMambaForCausalLM:
    """A freshly initialised model of one of MODEL_SIZES."""
    return TwoMambaForCausalLM(make_config(model_size, model_max_length, vocab_size, attention_type, mlp_type))


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise FileNotFoundError(f"no model weights in {path}: expected model.safetensors (or its index, or pytorch_model.bin)")


def load_plain(path: str):
    """torch.load with weights_only=True: tensors and plain values only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's message is long; its "Unsupported global" line names the object that would need unpickling.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
        detail = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise ValueError(f"could not read {path} (only tensors and plain values are accepted): {detail}") from err


def load_state_dict_file(file: str) -> dict[str, torch.Tensor]:
    """Tensors of one weights file; never unpickles objects."""
    if not file.endswith(".safetensors"):
        return load_plain(file)
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except Exception as err:  # a truncated or foreign file: name it
        raise ValueError(f"could not read model weights from {file}: {err}") from err


def load_training_config(path: str) -> dict | None:
    """The seed's config.pt (a plain dict); None when absent."""
    file = os.path.join(path, "config.pt")
    return load_plain(file) if os.path.isfile(file) else None


def read_config(path: str, vocab_size: int | None) -> TwoMambaConfig:
    """config.json (preferred) or config.pt of a checkpoint directory -> TwoMambaConfig."""
    train_cfg = load_training_config(path)
    json_file = os.path.join(path, "config.json")
    if os.path.isfile(json_file):
        try:
            with open(json_file) as f:
                raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{json_file} is not valid JSON: {err}") from err
        if "attention_type" not in raw:
            if not train_cfg or "attention_type" not in train_cfg:
                raise ValueError(f"{json_file} has no attention_type and there is no config.pt that names one")
            raw["attention_type"] = train_cfg["attention_type"]
        raw.setdefault("mlp_type", (train_cfg or {}).get("mlp_type", "normal"))
        attention_config(raw["attention_type"])
        for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
            raw.pop(key, None)
        return TwoMambaConfig.from_dict(raw)
    if train_cfg is None:
        raise FileNotFoundError(f"no config.json or config.pt in {path}")
    missing = [k for k in ("model_size", "attention_type") if k not in train_cfg]
    if missing:
        raise ValueError(f"{os.path.join(path, 'config.pt')} lacks {missing}")
    max_len = train_cfg.get("model_max_length") or 8192
    return make_config(train_cfg["model_size"], max_len, vocab_size or 32000, train_cfg["attention_type"],
                       train_cfg.get("mlp_type") or "normal")


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> TwoMambaForCausalLM:
    """Load a checkpoint directory (ours or the seed's / the authors' published ones) in eval mode.

    The seed's `self_attn.attn_mask` buffers are ignored; every other key must match.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    state = {}
    for file in _weight_files(path):
        state.update(load_state_dict_file(file))
    state = {k: v for k, v in state.items() if not k.endswith("self_attn.attn_mask")}
    embed = state.get("model.embed_tokens.weight")
    config = read_config(path, None if embed is None else embed.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TwoMambaForCausalLM(config)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights in {path} do not fit attention_type={config.attention_type!r}: "
            f"missing {result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )
    return model.to(device=device, dtype=dtype).eval()
