"""Text generation from a checkpoint through the model's own `generate` (transformers GenerationMixin).

Efficient decoding (the default) keeps each layer's cache: a recurrent state or a KV cache, one cheap
forward per new token; `--no_efficient` re-runs the whole sequence for every token (the seed's slow path).

Library:  from GPT_Trainer.infer2 import generate
CLI:      python GPT_Trainer/infer2.py --model_path models/RUN_NAME --prompt "Once upon a time" --max_new_tokens 64
"""
from __future__ import annotations

import argparse
import sys

import torch
from transformers import GenerationConfig, TextStreamer

from GPT_Trainer.cli import UserError, run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Strings (tokenized with the special tokens the model was trained with: BOS) or token-id lists."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        raise TypeError("prompts must be a list of prompts (strings, or lists of token ids)")
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass token-id lists with tokenizer=None")
            prompt = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(prompt) == 0:
            raise ValueError("empty prompt: every prompt needs at least one token")
        ids.append([int(t) for t in prompt])
    return ids


def generation_config(max_new_tokens, *, sample=False, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                      pad_token_id=0, use_cache=True) -> GenerationConfig:
    """Greedy decoding, or sampling at `temperature` from the top_k most likely tokens / the top_p mass (None:
    no such cut); stops a sequence after eos_token_id unless it is None."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    options = {}
    if sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        # top_k 0 switches off transformers' default cut at 50
        options = dict(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
    # an empty list, not None: generate would fill None in from the model's config and stop there
    eos = [] if eos_token_id is None else eos_token_id
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos,
                            pad_token_id=pad_token_id, use_cache=use_cache, **options)


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, longest] with the prompts right-aligned, and their attention_mask (0 at the padding)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, sample=False, temperature=1.0, top_k=None, top_p=None,
             use_efficient=True, stop_at_eos=True, *, streamer=None):
    """Continue every prompt by up to `max_new_tokens` tokens; returns the new token ids per prompt.

    prompts: strings (needs `tokenizer`) or lists of token ids; lengths may differ (they are left-padded
    into one batch). A sequence stops after emitting EOS (kept in its output) when `stop_at_eos`.
    use_efficient: the layers' caches (one cheap forward per token); False re-runs the full sequence each
    step. Sampling draws from torch's global generator (torch.manual_seed for reproducible runs).
    streamer: a transformers streamer (e.g. TextStreamer), batches of one prompt.
    """
    ids = encode_prompts(tokenizer, prompts)
    eos = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
    pad = 0 if eos is None else eos
    config = generation_config(max_new_tokens, sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_token_id=eos if stop_at_eos else None, pad_token_id=pad, use_cache=use_efficient)
    input_ids, attention_mask = left_padded(ids, pad, model.device)
    sequences = model.generate(input_ids, attention_mask=attention_mask, generation_config=config, streamer=streamer)
    outputs = []
    for row in sequences[:, input_ids.shape[1]:].tolist():
        if stop_at_eos and eos in row:
            row = row[:row.index(eos) + 1]
        outputs.append(row)
    return outputs


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """bfloat16 on GPU and float32 on CPU unless named."""
    if name is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_for_inference(model_path: str, device: str, dtype: str | None):
    """(model in eval mode, its tokenizer) from a checkpoint directory; a missing or unreadable checkpoint
    is a UserError naming the file."""
    from GPT_Trainer.data import load_tokenizer
    from GPT_Trainer.modeling import load_model

    try:
        return load_model(model_path, device=device, dtype=resolve_dtype(dtype, device)), load_tokenizer(model_path)
    except (FileNotFoundError, ValueError) as err:  # the tokenizer's errors (TokenizerUnavailable) too
        raise UserError(str(err)) from err


def add_model_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model_path", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--no_efficient", action="store_true", help="re-run the whole sequence for every token (slow)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", default="The grass is green. The sky is")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed of torch's generator, for reproducible sampling")
    args = parser.parse_args(argv)
    try:
        generation_config(args.max_new_tokens, sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p)
    except ValueError as err:
        raise UserError(f"--{err}") from err

    model, tokenizer = load_for_inference(args.model_path, args.device, args.dtype)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    print(args.prompt, end="", flush=True)
    generate(model, tokenizer, [args.prompt], args.max_new_tokens, sample=args.sample, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, use_efficient=not args.no_efficient,
             streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))


if __name__ == "__main__":
    sys.exit(run(main))
