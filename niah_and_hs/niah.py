"""Needle-in-a-haystack (pass-key retrieval) accuracy per context length (docs/inference.md).

The original procedure: shuffle the row indices with numpy seed 420, drop rows with context_length >= 32768,
keep the first --num_evals, decode greedily in float32 (--dtype) up to 10 tokens after each prompt, stopping
at EOS; decode the last 10 tokens of prompt + answer, take the text before the first space and keep its
digits; a row is correct iff they equal the answer.

Data, first match wins:
  --builtin                the pass-key generator of GPT_Trainer/passkey.py at --context_lengths (characters)
  --dataset PATH           a local copy (parquet / jsonl / json file, or a directory of parquet files) with
                           the columns prompt, answer, context_length
  (neither)                the hub dataset nanotron/simple_needle_in_a_hay_stack (needs the network); when
                           unreachable, the built-in generator, with a NOTE line on stdout and the reason
                           in the results' "source"

    python niah_and_hs/niah.py --model_path models/RUN_NAME --out niah_and_hs/results/RUN_NAME.json
    python niah_and_hs/niah_heatmap.py niah_and_hs/results/*.json
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from GPT_Trainer.cli import UserError, run
from GPT_Trainer.infer2 import add_model_args, encode_prompts, generate, load_for_inference
from GPT_Trainer.passkey import passkey_example

HUB_DATASET = "nanotron/simple_needle_in_a_hay_stack"
SHUFFLE_SEED = 420
MAX_CONTEXT_LENGTH = 32768  # rows at or above it are dropped (the seed's memory limit)
DEFAULT_CONTEXT_LENGTHS = [1024, 2048, 4096, 8192, 16384]
COLUMNS = ("prompt", "answer", "context_length")


def _check_columns(rows, source):
    if not rows:
        raise ValueError(f"{source} has no rows; expected rows with the columns {COLUMNS}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(c not in row for c in COLUMNS):
            found = sorted(row) if isinstance(row, dict) else f"a {type(row).__name__}"
            raise ValueError(f"row {i + 1} of {source} must have the columns {COLUMNS}; found {found}")
        try:
            int(row["context_length"])
        except (TypeError, ValueError):
            raise ValueError(f"row {i + 1} of {source} has context_length {row['context_length']!r}; "
                             "it must be an integer") from None
    return rows


def _read_json_rows(file) -> list:
    """Rows of a .jsonl (one JSON object a line) or .json (a list of objects) file; a malformed line or file
    is a ValueError naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            if file.endswith(".json"):
                rows = json.load(f)
                if not isinstance(rows, list):
                    raise ValueError(f"{file} holds a JSON {type(rows).__name__}; expected a list of rows")
                return rows
            rows = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{file} line {number} is not valid JSON ({err}); each line must be one "
                                         f"JSON object with the columns {COLUMNS}") from err
            return rows
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); expected a list of rows with the columns {COLUMNS}") from err


def load_local_rows(path: str) -> list[dict]:
    """Rows of a parquet / jsonl / json file or a directory of parquet files."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"NIAH dataset not found: {path}")
    rows = []
    for file in files:
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows += pq.read_table(file, columns=list(COLUMNS)).to_pylist()
        elif file.endswith((".jsonl", ".json")):
            rows += _read_json_rows(file)
        else:
            raise ValueError(f"unsupported NIAH dataset file {file}: use .parquet, .jsonl or .json")
    return _check_columns(rows, path)


def load_hub_rows() -> list[dict]:
    """The hub dataset's train split; raises (ImportError, network errors) when out of reach."""
    from datasets import load_dataset

    data = load_dataset(HUB_DATASET, split="train")
    return _check_columns([{c: row[c] for c in COLUMNS} for row in data], HUB_DATASET)


def builtin_rows(context_lengths, num_evals: int) -> list[dict]:
    """Enough generated pass-key rows that the first `num_evals` after the shuffle cover every length."""
    rng = random.Random(SHUFFLE_SEED)
    per_length = math.ceil(num_evals / len(context_lengths))
    rows = []
    for length in context_lengths:
        for _ in range(per_length):
            prompt, answer = passkey_example(rng, length)
            rows.append({"prompt": prompt, "answer": answer, "context_length": length})
    return rows


def select_rows(rows, num_evals: int) -> list[dict]:
    """The seed's subset: numpy seed 420 shuffle of the indices, context_length < 32768, first num_evals."""
    np.random.seed(SHUFFLE_SEED)
    indices = np.arange(len(rows))
    np.random.shuffle(indices)
    kept = [rows[i] for i in indices if int(rows[i]["context_length"]) < MAX_CONTEXT_LENGTH]
    return kept[:num_evals]


def predicted_key(tokenizer, prompt: list[int], new_tokens: list[int], window: int) -> str:
    """The original's scoring: decode the last `window` tokens of prompt + answer (the answer without its EOS,
    which the original never appends), take the text before the first space, keep its digits. An answer
    that stopped early therefore brings the end of the prompt into the window, as it did there."""
    eos = tokenizer.eos_token_id
    answer = new_tokens[:new_tokens.index(eos)] if eos in new_tokens else new_tokens
    text = tokenizer.decode((list(prompt) + answer)[-window:])
    # Llama-2's sentencepiece decode drops the leading space of the first piece; byte-level BPEs keep it
    text = text[1:] if text.startswith(" ") else text
    return "".join(ch for ch in text.split(" ")[0] if ch.isdigit())


def evaluate(model, tokenizer, rows, *, max_new_tokens=10, use_efficient=True, batch_size=1, progress=True):
    """Per-context-length tallies {length: {"correct", "total", "prompt_tokens"}} over `rows`."""
    tally = defaultdict(lambda: {"correct": 0, "total": 0, "prompt_tokens": 0})
    bar = tqdm(total=len(rows), desc="NIAH", disable=not progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts = encode_prompts(tokenizer, [row["prompt"] for row in batch])
        outputs = generate(model, tokenizer, prompts, max_new_tokens, use_efficient=use_efficient, stop_at_eos=True)
        for row, prompt, out in zip(batch, prompts, outputs):
            entry = tally[int(row["context_length"])]
            entry["total"] += 1
            entry["prompt_tokens"] += len(prompt)
            entry["correct"] += predicted_key(tokenizer, prompt, out, max_new_tokens) == str(row["answer"])
        bar.update(len(batch))
        done = sum(e["total"] for e in tally.values())
        bar.set_postfix(accuracy=f"{sum(e['correct'] for e in tally.values()) / done:.3f}")
    bar.close()
    return dict(tally)


def summarize(tally) -> list[dict]:
    return [
        {"context_length": length, "correct": e["correct"], "total": e["total"],
         "accuracy": e["correct"] / e["total"], "mean_prompt_tokens": round(e["prompt_tokens"] / e["total"], 1)}
        for length, e in sorted(tally.items())
    ]


def get_rows(args) -> tuple[list[dict], str]:
    """(rows, source description) following the data precedence in the module docstring."""
    if args.builtin:
        return builtin_rows(args.context_lengths, args.num_evals), "builtin"
    if args.dataset:
        try:
            return load_local_rows(args.dataset), f"file:{args.dataset}"
        except (FileNotFoundError, ValueError) as err:
            raise UserError(str(err)) from err
    try:
        return load_hub_rows(), f"hub:{HUB_DATASET}"
    except Exception as err:  # no network, no hub access: fall back to the offline generator, and say so
        reason = f"hub dataset {HUB_DATASET} unreachable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        print(f"NOTE: {reason}; these results come from the built-in pass-key generator at context lengths "
              f"{args.context_lengths}, not from the paper's dataset (--builtin says this on purpose)")
        return builtin_rows(args.context_lengths, args.num_evals), f"builtin ({reason})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--dataset", default=None, help="local parquet/jsonl/json copy of the NIAH dataset")
    parser.add_argument("--builtin", action="store_true", help="generate the pass-key prompts offline")
    parser.add_argument("--context_lengths", nargs="+", type=int, default=DEFAULT_CONTEXT_LENGTHS,
                        help="built-in generator: prompt lengths in characters")
    parser.add_argument("--num_evals", type=int, default=1000)
    parser.add_argument("--max_new_tokens", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--out", default=None, help="results JSON (default niah_and_hs/results/<model dir name>.json)")
    parser.set_defaults(dtype="float32")  # the original ran NIAH in float32, on the GPU too
    args = parser.parse_args(argv)
    for flag in ("num_evals", "batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")

    rows, source = get_rows(args)
    rows = select_rows(rows, args.num_evals)
    if not rows:
        raise UserError("no NIAH rows left after dropping context_length >= 32768")
    model, tokenizer = load_for_inference(args.model_path, args.device, args.dtype)
    with torch.no_grad():
        tally = evaluate(model, tokenizer, rows, max_new_tokens=args.max_new_tokens,
                         use_efficient=not args.no_efficient, batch_size=args.batch_size)
    per_length = summarize(tally)
    correct, total = sum(r["correct"] for r in per_length), sum(r["total"] for r in per_length)
    result = {
        "model_path": args.model_path,
        "attention_type": model.config.attention_type,
        "source": source,
        "per_length": per_length,
        "overall": {"correct": correct, "total": total, "accuracy": correct / total},
        "settings": {"num_evals": args.num_evals, "max_new_tokens": args.max_new_tokens, "shuffle_seed": SHUFFLE_SEED,
                     "max_context_length": MAX_CONTEXT_LENGTH, "efficient": not args.no_efficient,
                     "device": args.device, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                     "batch_size": args.batch_size,
                     "context_lengths": args.context_lengths if source.startswith("builtin") else None},
    }
    print(f"\n{'context_length':>14} {'~tokens':>8} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for r in per_length:
        print(f"{r['context_length']:>14} {r['mean_prompt_tokens']:>8} {r['correct']:>8} {r['total']:>6} {r['accuracy']:>9.3f}")
    print(f"{'all':>14} {'':>8} {correct:>8} {total:>6} {correct / total:>9.3f}")
    out = args.out or os.path.join("niah_and_hs", "results", os.path.basename(os.path.normpath(args.model_path)) + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(run(main))
