"""Text generation from a checkpoint: efficient (recurrent state / KV cache) or full-recompute decoding.

Library:  from GPT_Trainer.infer2 import generate
CLI:      python GPT_Trainer/infer2.py --model_path models/RUN_NAME --prompt "Once upon a time" --max_new_tokens 64
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from GPT_Trainer.decoding import DEFAULT_CHUNK_SIZE, ModelDecoder, cat_states, reserve

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


def next_token(logits, *, sample=False, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits [B, V] -> token ids [B]: argmax, or a draw from the temperature / top-k / top-p distribution."""
    if not sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the more likely ones already cover top_p (the most likely always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _efficient_decoder(model, prompts, max_new_tokens, chunk_size):
    """Prefill (grouped by prompt length, right-aligned) -> (first logits, advance(tokens) -> logits, order)."""
    decoder = ModelDecoder(model, chunk_size)
    device = next(model.parameters()).device
    groups = defaultdict(list)
    for i, ids in enumerate(prompts):
        groups[len(ids)].append(i)
    longest = max(groups)
    logits, states, order = [], [], []
    for length, members in groups.items():
        ids = torch.tensor([prompts[i] for i in members], device=device)
        group_logits, group_states = decoder.prefill(ids, offset=longest - length)
        logits.append(group_logits)
        states.append(group_states)
        order += members
    states = cat_states(states)
    reserve(states, max_new_tokens)
    return torch.cat(logits), lambda tokens: decoder.step(tokens, states), order


def _full_decoder(model, prompts):
    """The seed's slow path: re-run the whole sequence for every new token (one sequence at a time)."""
    device = next(model.parameters()).device
    sequences = [list(p) for p in prompts]

    @torch.no_grad()
    def logits_now():
        return torch.cat([model(torch.tensor([s], device=device)).logits[:, -1] for s in sequences])

    def advance(tokens):
        for seq, tok in zip(sequences, tokens.tolist()):
            seq.append(tok)
        return logits_now()

    return logits_now(), advance, list(range(len(prompts)))


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, sample=False, temperature=1.0, top_k=None, top_p=None,
             use_efficient=True, stop_at_eos=True, *, generator=None, on_step=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """Continue every prompt by up to `max_new_tokens` tokens; returns the new token ids per prompt.

    prompts: strings (needs `tokenizer`) or lists of token ids; lengths may differ. A sequence stops
    after emitting EOS (kept in its output) when `stop_at_eos`. use_efficient: recurrent states / KV caches
    (one cheap step per token); False re-runs the full sequence each step. generator: torch.Generator for
    sampling. on_step(tokens): called after each step with the list of new ids per prompt (None once done).
    """
    ids = encode_prompts(tokenizer, prompts)
    if max_new_tokens <= 0:
        return [[] for _ in ids]
    eos = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
    if use_efficient:
        logits, advance, order = _efficient_decoder(model, ids, max_new_tokens, chunk_size)
    else:
        logits, advance, order = _full_decoder(model, ids)
    outputs = [[] for _ in ids]
    done = [False] * len(ids)
    for step in range(max_new_tokens):
        tokens = next_token(logits, sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
        emitted = [None] * len(ids)
        for prompt_index, tok in zip(order, tokens.tolist()):
            if not done[prompt_index]:
                outputs[prompt_index].append(tok)
                emitted[prompt_index] = tok
                done[prompt_index] = stop_at_eos and tok == eos
        if on_step is not None:
            on_step(emitted)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = advance(tokens)
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
    """(model in eval mode, its tokenizer) from a checkpoint directory."""
    from GPT_Trainer.data import load_tokenizer
    from GPT_Trainer.modeling import load_model

    model = load_model(model_path, device=device, dtype=resolve_dtype(dtype, device))
    return model, load_tokenizer(model_path)


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
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    args = parser.parse_args(argv)

    model, tokenizer = load_for_inference(args.model_path, args.device, args.dtype)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    generated, printed = [], ""

    def stream(tokens):
        nonlocal printed
        if tokens[0] is not None:
            generated.append(tokens[0])
            text = tokenizer.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[len(printed):], end="", flush=True)
                printed = text

    print(args.prompt, end="", flush=True)
    generate(model, tokenizer, [args.prompt], args.max_new_tokens, sample=args.sample, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, use_efficient=not args.no_efficient, generator=generator,
             on_step=stream)
    print()


if __name__ == "__main__":
    main()
