"""Llama-2 causal LM with pluggable attention; state-dict keys equal transformers.LlamaForCausalLM's.

A registered transformers model (model_type "twomamba"): after `import GPT_Trainer.modeling`,
`AutoModelForCausalLM.from_pretrained(run_dir)` builds it and `model.generate(...)` decodes with the
blocks' own caches (docs/inference.md). `get_model` builds a fresh model of a named size, `load_model`
loads a checkpoint directory in the seed's layout too (a config.json of model_type "llama" with an
attention_type, or config.pt; model.safetensors) without unpickling any object.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from GPT_Trainer.cache import TwoMambaCache
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, LlamaDecoderLayer, RMSNorm, attention_config


class TwoMambaConfig(LlamaConfig):
    """LlamaConfig's fields plus the attention type and the MLP type, under its own model_type. The seed
    saved LlamaConfig (model_type "llama") with an attention_type; `read_config` converts those on load."""

    model_type = "twomamba"
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
                config.mlp_type, config.rms_norm_eps, layer_idx=i,
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, cache: TwoMambaCache | None = None, padding: torch.Tensor | None = None):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cache, padding)
        return self.norm(x)


class TwoMambaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TwoMambaConfig
    base_model_prefix = "model"
    _keys_to_ignore_on_load_unexpected = [r"self_attn\.attn_mask$"]
    _no_split_modules = ["LlamaDecoderLayer"]
    _is_stateful = True  # recurrent states cannot be rolled back: no assisted decoding
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

    def __init__(self, config: TwoMambaConfig):
        attention_config(config.attention_type)  # fail early, listing the valid names
        super().__init__(config)
        self.model = TwoMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decode_with_cuda_graph = True  # generate on CUDA replays one-token steps (GPT_Trainer/cuda_graph.py)
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

    def new_cache(self, max_length: int | None = None, batch_size: int | None = None) -> TwoMambaCache:
        """An empty cache for `forward(..., past_key_values=cache)`; max_length: KV slots to allocate up front.

        With batch_size, on CUDA and with `decode_with_cuda_graph`, a model whose layers all keep fixed-size
        states gets its one-token step captured in a CUDA graph (GPT_Trainer/cuda_graph.py), replayed by
        every later one-token forward on this cache (input_ids of shape [batch_size, 1])."""
        cache = TwoMambaCache(self.config.num_hidden_layers, max_length)
        if batch_size is not None and self.decode_with_cuda_graph and self.device.type == "cuda":
            from GPT_Trainer.cuda_graph import GraphStep

            cache.step_graph = GraphStep.capture_if_supported(self, cache, batch_size)
        return cache

    def forward(self, input_ids, attention_mask=None, past_key_values: TwoMambaCache | None = None,
                use_cache: bool | None = None, labels=None, logits_to_keep: int = 0, return_dict: bool | None = None):
        """The one forward of training, prefill and decoding steps.

        input_ids [B, N]: the new tokens. attention_mask [B, past + N] (or [B, N]): 1 for tokens, 0 for left
        padding (prompts of different lengths in one batch); only the new tokens' columns are read, and a
        one-token step after a prompt is never padding. past_key_values: a TwoMambaCache these tokens
        continue, updated in place and returned; use_cache=True starts one when none is passed.
        labels follow the Hugging Face convention (shifted inside; -100 is ignored). logits_to_keep: only
        the logits of the last that many tokens (0: all).
        """
        if return_dict is False:
            raise ValueError("TwoMambaForCausalLM returns a CausalLMOutputWithPast; return_dict=False is not supported")
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        if past_key_values is not None and not isinstance(past_key_values, TwoMambaCache):
            raise TypeError(f"past_key_values must be a TwoMambaCache (model.new_cache()), got {type(past_key_values).__name__}")
        padding = self._padding(attention_mask, input_ids, past_key_values)
        graph = None if past_key_values is None else past_key_values.step_graph
        if graph is not None and input_ids.shape[1] == 1 and past_key_values.seen_tokens > 0:
            logits = graph.replay(input_ids)
        else:
            hidden = self.model(input_ids, past_key_values, padding)
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if past_key_values is not None:
            past_key_values.seen_tokens += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    @staticmethod
    def _padding(attention_mask, input_ids, cache) -> torch.Tensor | None:
        """The new tokens' columns of attention_mask as bool [B, N], or None when nothing is padding.

        Reading the mask costs one device-to-host sync; a one-token step after a prompt skips it."""
        if attention_mask is None:
            return None
        batch, n = input_ids.shape
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < n:
            raise ValueError(f"attention_mask must be [batch, past + new tokens] with 1 for tokens and 0 for left padding; "
                             f"got shape {tuple(attention_mask.shape)} for input_ids {tuple(input_ids.shape)}")
        if n == 1 and cache is not None and cache.seen_tokens > 0:
            return None
        padding = attention_mask[:, -n:].bool()
        unpadded, left_only = torch.stack([padding.all(), (padding[:, 1:] >= padding[:, :-1]).all()]).tolist()
        if not left_only:
            raise ValueError("attention_mask may only mark left padding (zeros before a row's first token)")
        return None if unpadded else padding

    # generate() support: the cache is the model's own, created with room for prompt + new tokens
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        cache = model_kwargs.get("past_key_values")
        if cache is not None:
            if not isinstance(cache, TwoMambaCache):
                raise TypeError(f"past_key_values must be a TwoMambaCache (model.new_cache()), got {type(cache).__name__}")
            return
        if generation_config.cache_implementation is not None:
            raise ValueError("TwoMambaForCausalLM keeps its own caches; cache_implementation is not supported")
        if generation_config.use_cache is False:
            return
        model_kwargs["past_key_values"] = self.new_cache(max_cache_length, batch_size * generation_config.num_return_sequences)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=None,
                                      logits_to_keep=None, next_sequence_length=None, is_first_iteration=False,
                                      **kwargs):
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:  # e.g. output_attentions=True: there are no attention maps to return
            raise ValueError(f"TwoMambaForCausalLM.generate does not support {unsupported}")
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values,
                  "use_cache": use_cache}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs


AutoConfig.register(TwoMambaConfig.model_type, TwoMambaConfig, exist_ok=True)
AutoModelForCausalLM.register(TwoMambaConfig, TwoMambaForCausalLM, exist_ok=True)


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
        raw.pop("model_type", None)  # the seed's "llama" configs convert on load
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
