"""Llama-2 causal LM with pluggable attention; state-dict keys equal transformers.LlamaForCausalLM's.

A registered transformers model (model_type "twomamba"): after `import GPT_Trainer.modeling`,
`AutoModelForCausalLM.from_pretrained(run_dir)` builds it and `model.generate(...)` decodes with the
blocks' own caches (docs/inference.md). `get_model` builds a fresh model of a named size, `load_model`
loads a checkpoint directory in the seed's layout too (a config.json of model_type "llama" with an
attention_type, or config.pt; model.safetensors) without unpickling any object. Before a model is
allocated, `load_model` checks the config's fields, that every record of the attention type (config.json,
config.pt, the weights' safetensors metadata) agrees, and that the config's parameter shapes are those
in the weights files' headers; `save_pretrained` records the attention type in that metadata.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from GPT_Trainer.cache import TwoMambaCache
from GPT_Trainer.cli import UserError
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, LlamaDecoderLayer, RMSNorm, attention_config, configs

ATTENTION_TYPE_KEY = "attention_type"  # the safetensors metadata entry save_pretrained writes
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
MLP_TYPES = ("normal", "gelu")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64")  # safetensors', torch's names


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be loaded as it is; the message names the file, what is wrong and what is
    allowed. A ValueError too, so the callers that report ValueErrors of loading in one line keep doing so."""


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
    "mini": ModelSize(512, 1024, 8, 8),
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

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """transformers' save_pretrained, then the attention type recorded in the metadata of every
        .safetensors weights file written (load_model compares it with the config)."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            for file in _weight_files(os.fspath(save_directory)):
                if file.endswith(".safetensors"):
                    _add_safetensors_metadata(file, {ATTENTION_TYPE_KEY: self.config.attention_type})

    def set_activation_checkpointing(self, enabled: bool = True):
        """Recompute the MLPs and the attention cores that hold more than their output in the backward pass (the
        seed's memory saving): the chunked 2Mamba form and the Mamba-2 block, not the quadratic kernels (softmax's
        SDPA and ours), whose saved tensors are about their output's size (docs/training.md)."""
        for layer in self.model.layers:
            if hasattr(layer.self_attn, "checkpoint_core"):
                layer.self_attn.checkpoint_core = enabled
            layer.checkpoint_mlp = enabled
        return self

    def new_cache(self, max_length: int | None = None, batch_size: int | None = None) -> TwoMambaCache:
        """An empty cache for `forward(..., past_key_values=cache)`; max_length: the tokens a KV cache holds
        (allocated up front; more raise), None: KV caches grow as needed.

        With batch_size, on CUDA and with `decode_with_cuda_graph`, the one-token step is captured in a CUDA
        graph (GPT_Trainer/cuda_graph.py), replayed by every later one-token forward on this cache (input_ids
        of shape [batch_size, 1]); for a model with KV caches (softmax, exp types) only with max_length."""
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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to file names")
        return sorted({os.path.join(path, name) for name in weight_map.values()})
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise FileNotFoundError(f"no model weights in {path}: expected model.safetensors (or its index, or pytorch_model.bin)")


def _add_safetensors_metadata(file: str, entries: dict[str, str]) -> None:
    """Merge entries into the header's __metadata__ of a safetensors file (rewritten through a temporary file;
    the tensor data is copied unchanged after the new header, padded to 8 bytes as safetensors writes it)."""
    tmp = file + ".tmp"
    with open(file, "rb") as src:
        header = json.loads(src.read(int.from_bytes(src.read(8), "little")))
        header["__metadata__"] = {**header.get("__metadata__", {}), **entries}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(tmp, "wb") as dst:
            dst.write(len(encoded).to_bytes(8, "little") + encoded)
            shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(tmp, file)


def load_plain(path: str):
    """torch.load with weights_only=True: tensors and plain values only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's message is long; its "Unsupported global" line names the object that would need unpickling.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
        detail = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise CheckpointError(f"could not read {path} (only tensors and plain values are accepted): {detail}") from err


def load_state_dict_file(file: str) -> dict[str, torch.Tensor]:
    """Tensors of one weights file; never unpickles objects."""
    if not file.endswith(".safetensors"):
        state = load_plain(file)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file} does not hold a state dict (a dict of tensor names to tensors)")
        return state
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except Exception as err:  # a truncated or foreign file: name it
        raise CheckpointError(f"could not read model weights from {file}: {_one_line(err)}") from err


def _is_seed_mask(name: str) -> bool:
    return name.endswith("self_attn.attn_mask")  # the seed's causal-mask buffers, ignored on load


def _weights_header(file: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """({tensor name: (shape, dtype)}, metadata) of one weights file, without the seed's masks; a .safetensors
    file is read from its header alone, a .bin file whole."""
    if not file.endswith(".safetensors"):
        state = load_state_dict_file(file)
        return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items() if not _is_seed_mask(k)}, {}
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
                      if not _is_seed_mask(k)}
            return shapes, f.metadata() or {}
    except Exception as err:
        raise CheckpointError(f"could not read model weights from {file} (a safetensors file): {_one_line(err)}") from err


def load_training_config(path: str) -> dict | None:
    """The seed's config.pt (a plain dict); None when absent."""
    file = os.path.join(path, "config.pt")
    if not os.path.isfile(file):
        return None
    config = load_plain(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} holds a {type(config).__name__}; a training config is a dict of settings")
    return config


def _read_json_object(file: str, what: str) -> dict:
    try:
        with open(file, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({_one_line(err)}); expected {what}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}; expected {what} (a JSON object)")
    return raw


def _known_attention_type(value, source: str) -> str:
    if not isinstance(value, str) or value not in configs:
        raise CheckpointError(f"{source} names attention_type {value!r}; known types: {', '.join(configs)}")
    return value


def _check_config_fields(raw: dict, source: str) -> None:
    """The fields a model is built from: positive integer sizes, heads dividing hidden_size, a known MLP type,
    a norm epsilon in (0, 1)."""
    missing = [k for k in SIZE_FIELDS if k not in raw]
    bad = [f"{k}={raw[k]!r}" for k in SIZE_FIELDS if k in raw and (type(raw[k]) is not int or raw[k] < 1)]
    if missing or bad:
        wrong = "; ".join(filter(None, [missing and f"lacks {', '.join(missing)}", bad and f"has {', '.join(bad)}"]))
        raise CheckpointError(f"{source} {wrong}; a model config needs {', '.join(SIZE_FIELDS)} as positive integers")
    if raw["hidden_size"] % raw["num_attention_heads"]:
        raise CheckpointError(f"{source} has hidden_size {raw['hidden_size']}, which num_attention_heads "
                              f"{raw['num_attention_heads']} does not divide; it must be a multiple of the head count")
    if raw["mlp_type"] not in MLP_TYPES:
        raise CheckpointError(f"{source} names mlp_type {raw['mlp_type']!r}; allowed: {', '.join(MLP_TYPES)}")
    eps = raw.get("rms_norm_eps", 1e-5)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise CheckpointError(f"{source} has rms_norm_eps {eps!r}; it must be a number between 0 and 1")


def _config_source(path: str) -> str:
    json_file = os.path.join(path, "config.json")
    return json_file if os.path.isfile(json_file) else os.path.join(path, "config.pt")


def read_config(path: str, vocab_size: int | None) -> TwoMambaConfig:
    """config.json (preferred) or config.pt of a checkpoint directory -> TwoMambaConfig, checked field by field
    and for an attention type on which both files agree; every failure is a CheckpointError."""
    train_cfg = load_training_config(path)
    pt_file = os.path.join(path, "config.pt")
    pt_type = None
    if train_cfg and "attention_type" in train_cfg:
        pt_type = _known_attention_type(train_cfg["attention_type"], pt_file)
    json_file = os.path.join(path, "config.json")
    if os.path.isfile(json_file):
        raw = _read_json_object(json_file, "a model config")
        raw.pop("model_type", None)  # the seed's "llama" configs convert on load
        if "attention_type" not in raw:
            if pt_type is None:
                raise CheckpointError(f"{json_file} has no attention_type and there is no config.pt that names one")
            raw["attention_type"] = pt_type
        json_type = _known_attention_type(raw["attention_type"], json_file)
        if pt_type is not None and json_type != pt_type:
            raise CheckpointError(f"{json_file} says attention_type {json_type!r} but {pt_file} says {pt_type!r}; "
                                  "both must name the type the weights were trained as")
        raw.setdefault("mlp_type", (train_cfg or {}).get("mlp_type") or "normal")
        _check_config_fields(raw, json_file)
        for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
            raw.pop(key, None)
        try:
            return TwoMambaConfig.from_dict(raw)
        except Exception as err:  # plain JSON values that transformers' LlamaConfig validation refuses
            raise CheckpointError(f"{json_file} is not a valid model config: {_one_line(err)}") from err
    if train_cfg is None:
        raise FileNotFoundError(f"no config.json or config.pt in {path}")
    if pt_type is None or train_cfg.get("model_size") not in MODEL_SIZES:
        raise CheckpointError(f"{pt_file} has model_size {train_cfg.get('model_size')!r} and attention_type {pt_type!r}; "
                              f"it needs a model_size among {', '.join(MODEL_SIZES)} and an attention_type")
    mlp_type = train_cfg.get("mlp_type") or "normal"
    if mlp_type not in MLP_TYPES:
        raise CheckpointError(f"{pt_file} names mlp_type {mlp_type!r}; allowed: {', '.join(MLP_TYPES)}")
    max_len = train_cfg.get("model_max_length") or 8192
    return make_config(train_cfg["model_size"], max_len, vocab_size or 32000, pt_type, mlp_type)


def _expected_shapes(config: TwoMambaConfig) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of the model a config builds, from a model on the meta device (no memory)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: tuple(v.shape) for k, v in TwoMambaForCausalLM(config).state_dict().items()}


def _attention_names(config: TwoMambaConfig, attention_type: str) -> set[str]:
    """The names of one layer's attention parameters under attention_type, at the config's sizes."""
    one_layer = TwoMambaConfig.from_dict({**config.to_dict(), "num_hidden_layers": 1, "attention_type": attention_type})
    return {k for k in _expected_shapes(one_layer) if ".self_attn." in k}


def _check_weights_fit(path: str, config: TwoMambaConfig, headers: dict[str, tuple[dict, dict]]) -> None:
    """The config against the weights files' headers: the attention type recorded with the weights, float
    dtypes, the embedding and layer count (checked first, so the meta model below has the weights' size),
    then every key and shape."""
    source, kind = _config_source(path), config.attention_type
    for file, (shapes, metadata) in headers.items():
        recorded = metadata.get(ATTENTION_TYPE_KEY)
        if recorded is not None and recorded != kind:
            raise CheckpointError(f"{source} says attention_type {kind!r} but {file} was saved as {recorded!r}; "
                                  "the config must name the type the weights were saved as")
        for name, (_, dtype) in shapes.items():
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{file} holds {name} as {dtype}; model weights must be floating point")
    shapes = {k: shape for file_shapes, _ in headers.values() for k, (shape, _) in file_shapes.items()}
    files = ", ".join(headers)
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and embed != (config.vocab_size, config.hidden_size):
        raise CheckpointError(f"{source} has vocab_size {config.vocab_size} and hidden_size {config.hidden_size} but the "
                              f"embedding in {files} is {list(embed)}; the config must be the one saved with the weights")
    layers = {int(m.group(1)) for k in shapes for m in [re.match(r"model\.layers\.(\d+)\.", k)] if m}
    if layers != set(range(config.num_hidden_layers)):
        raise CheckpointError(f"{source} has num_hidden_layers {config.num_hidden_layers} but {files} holds "
                              f"{len(layers)} layers; the config must be the one saved with the weights")
    try:
        expected = _expected_shapes(config)
    except ValueError as err:
        raise CheckpointError(f"{source}: {_one_line(err)}") from err
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = [f"{k} {list(shapes[k])} (the config's {list(expected[k])})" for k in expected.keys() & shapes.keys()
             if shapes[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    problems = [f"{label} {items[:3]}{'...' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shapes", sorted(wrong)))
                if items]
    message = f"the weights in {files} do not fit attention_type={kind!r} of {source}: {'; '.join(problems)}"
    weight_names = {k for k in shapes if k.startswith("model.layers.0.self_attn.")}
    fitting = [t for t in configs if _attention_names(config, t) == weight_names]
    if fitting and kind not in fitting:
        message += f"; the weights' attention parameters are those of {', '.join(fitting)}"
    raise CheckpointError(message)


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> TwoMambaForCausalLM:
    """Load a checkpoint directory (ours or the seed's / the authors' published ones) in eval mode.

    The config and the weights files' headers are checked against each other before the model is allocated;
    a checkpoint that does not fit raises CheckpointError naming the file. The seed's `self_attn.attn_mask`
    buffers are ignored.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    headers = {file: _weights_header(file) for file in _weight_files(path)}
    embed_shape = next((shapes["model.embed_tokens.weight"][0] for shapes, _ in headers.values()
                        if "model.embed_tokens.weight" in shapes), None)
    config = read_config(path, None if embed_shape is None else embed_shape[0])
    _check_weights_fit(path, config, headers)
    state = {}
    for file in headers:
        state.update(load_state_dict_file(file))
    state = {k: v for k, v in state.items() if not _is_seed_mask(k)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TwoMambaForCausalLM(config)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()
