"""Datasets, tokenizer and batching for training (SPEC sections 6 and 7).

Three kinds of data: the hub datasets the paper used (need `datasets` and the network), local files
(txt / jsonl / parquet / arrow, column `text`), and the built-in offline corpus generated here, which a
tiny model learns visibly in minutes on a CPU. Every dataset is an indexable sequence of documents;
training draws documents uniformly at random with replacement from a seeded, checkpointable sampler.
"""
from __future__ import annotations

import glob
import json
import os
import random
from collections.abc import Sequence

import torch

from GPT_Trainer.passkey import FILLER, passkey_example

BUILTIN = "builtin"
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")
DEFAULT_HUB_TOKENIZER = "meta-llama/Llama-2-7b-hf"
TEST_SPLIT_SEED = 123
PAD_MULTIPLE = 128

# Hub datasets of the paper: name -> (config name, name of the dataset's own test split or None).
HUB_DATASETS = {
    "HuggingFaceFW/fineweb": ("CC-MAIN-2024-51", None),
    "gmongaras/EleutherAI_the_pile_deduplicated": (None, None),
    "gmongaras/SlimPajama-627B_Reupload": (None, "test"),
}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow")

# ----------------------------------------------------------------------------------------------------
# The built-in corpus: deterministic documents of five kinds a small model can learn from.

BUILTIN_NUM_DOCS = 100_000
_ADJECTIVES = (
    "small", "green", "old", "quiet", "bright", "heavy", "blue", "warm", "tall", "slow", "young", "red",
    "cold", "dark", "happy", "strange", "gentle", "golden", "silver", "narrow", "wide", "busy", "lonely",
    "clever", "brave", "tired", "little", "ancient", "distant", "yellow", "white", "black", "wooden",
)
_NOUNS = (
    "cat", "river", "house", "tree", "bird", "stone", "child", "road", "ship", "garden", "dog", "horse",
    "teacher", "farmer", "mountain", "window", "letter", "basket", "forest", "island", "village", "castle",
    "bridge", "flower", "table", "candle", "lantern", "wagon", "soldier", "doctor", "painter", "baker",
    "kitchen", "library", "station", "harbor", "meadow", "valley", "mirror", "blanket", "violin", "engine",
)
_VERBS = (
    "sees", "follows", "finds", "passes", "watches", "likes", "leaves", "reaches", "remembers", "carries",
    "paints", "builds", "visits", "opens", "crosses", "answers", "forgets", "protects", "greets", "chases",
)
_PLACES = (
    "near the hill", "by the sea", "in the town", "under the bridge", "at the market", "behind the school",
    "before sunrise", "after dinner", "during the storm", "across the field", "inside the old church",
    "beside the lake", "in the morning", "at midnight", "on the northern road", "through the window",
)
_NAMES = (
    "Alice", "Bruno", "Clara", "Daniel", "Elena", "Felix", "Grace", "Hugo", "Irene", "Jonas", "Karin",
    "Lukas", "Maria", "Nora", "Oscar", "Paula", "Quentin", "Rosa", "Simon", "Tessa", "Victor", "Wanda",
    "Yusuf", "Zoe", "Amara", "Bernard", "Chloe", "Dmitri", "Esther", "Fatima", "Gustav", "Helena",
)
_CITIES = (
    "Lisbon", "Oslo", "Vienna", "Kyoto", "Lima", "Cairo", "Dublin", "Prague", "Quebec", "Nairobi",
    "Madrid", "Athens", "Denver", "Bergen", "Seville", "Krakow", "Glasgow", "Toronto", "Mumbai", "Perth",
)
_JOBS = ("teacher", "farmer", "doctor", "painter", "baker", "sailor", "engineer", "writer", "musician", "gardener")
_PASSKEY_CONTEXT_CHARS = (256, 512, 1024, 2048, 4096)


def _prose(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 12)):
        if rng.random() < 0.25:
            sentences.append(FILLER)
            continue
        a, b = rng.sample(_NOUNS, 2)
        sentences.append(
            f"The {rng.choice(_ADJECTIVES)} {a} {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} {b} "
            f"{rng.choice(_PLACES)}."
        )
    return " ".join(sentences)


def _counting(rng: random.Random) -> str:
    start, stride = rng.randint(0, 500), rng.choice((1, 1, 2, 5, 10))
    numbers = ", ".join(str(start + stride * i) for i in range(rng.randint(10, 40)))
    return f"Counting from {start} by {stride}: {numbers}."


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 10)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(("plus", "minus", "times"))
        result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        lines.append(f"{a} {op} {b} is {result}.")
    return " ".join(lines)


def _facts(rng: random.Random) -> str:
    sentences = []
    for name in rng.sample(_NAMES, rng.randint(2, 5)):
        sentences.append(
            f"{name} lives in {rng.choice(_CITIES)} and works as a {rng.choice(_JOBS)}. "
            f"{name} was born in {rng.randint(1900, 2020)} and has {rng.randint(2, 9)} {rng.choice(_NOUNS)}s."
        )
    return " ".join(sentences)


def _passkey(rng: random.Random) -> str:
    prompt, answer = passkey_example(rng, rng.choice(_PASSKEY_CONTEXT_CHARS))
    return f"{prompt}{answer}."


_GENERATORS = ((_prose, 0.25), (_facts, 0.15), (_counting, 0.15), (_arithmetic, 0.2), (_passkey, 0.25))


def builtin_document(index: int, split: str = "train") -> str:
    """Document `index` of the built-in corpus; the same (split, index) always gives the same text."""
    rng = random.Random(f"2mamba-builtin-{split}-{index}")  # str seeds hash with sha512: stable across runs
    generator = rng.choices([g for g, _ in _GENERATORS], weights=[w for _, w in _GENERATORS])[0]
    return generator(rng)


class BuiltinCorpus(Sequence):
    """A virtual corpus of `num_docs` documents generated on demand (nothing is stored)."""

    def __init__(self, split: str = "train", num_docs: int = BUILTIN_NUM_DOCS):
        self.split, self.num_docs = split, num_docs

    def __len__(self):
        return self.num_docs

    def __getitem__(self, index):
        if not 0 <= index < self.num_docs:
            raise IndexError(index)
        return builtin_document(index, self.split)


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def build_builtin_tokenizer(out_dir: str = TOKENIZER_DIR, vocab_size: int = 1024, num_docs: int = 4000):
    """Train the project's own byte-level BPE tokenizer on the built-in corpus and save it to out_dir.

    Llama-2-like conventions: <unk>=0, <s>=1 (BOS, added to every sequence), </s>=2 (EOS, also the pad
    token), and digits split into single-digit tokens so numbers are spelled digit by digit.
    Rebuild with `python -m GPT_Trainer.data build-tokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = BuiltinCorpus("train")
    tok.train_from_iterator((corpus[i] for i in range(num_docs)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        padding_side="right", model_max_length=1_000_000,
    )
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(name_or_path: str | None = None):
    """None or "builtin": the shipped offline tokenizer; otherwise a hub name or a local directory.

    The pad token is always set (to EOS, as the seed does for Llama-2) and padding is on the right.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path in (None, BUILTIN):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)
    elif os.path.isdir(name_or_path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as err:
            raise ValueError(
                f"could not load a tokenizer from the directory {name_or_path}: {err}\n"
                "expected tokenizer.json (or tokenizer.model) and tokenizer_config.json, as save_pretrained writes"
            ) from err
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as err:
            raise ValueError(
                f"could not load tokenizer {name_or_path!r} (not a local directory; the hub lookup failed: {err}).\n"
                f"Use --tokenizer {BUILTIN} for the offline tokenizer, or a directory holding tokenizer files."
            ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def default_tokenizer_name(dataset: str | None) -> str:
    """Llama-2's tokenizer for the paper's hub datasets (as the seed), the built-in one otherwise."""
    return DEFAULT_HUB_TOKENIZER if dataset in HUB_DATASETS else BUILTIN


# ----------------------------------------------------------------------------------------------------
# Datasets


class ArrowText(Sequence):
    """The `text` column of an Arrow table, indexed lazily (memory-mapped files stay on disk)."""

    def __init__(self, column):
        self.column = column

    def __len__(self):
        return len(self.column)

    def __getitem__(self, index):
        return self.column[index].as_py()


class Subset(Sequence):
    def __init__(self, data: Sequence, indices: Sequence[int]):
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.data[int(self.indices[index])]


def _local_files(path: str) -> list[str]:
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith(LOCAL_SUFFIXES))
    if not files:
        raise ValueError(f"no data files in {path}; expected files ending in {', '.join(LOCAL_SUFFIXES)}")
    return files


def _read_arrow_file(file: str, keep_in_memory: bool):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.endswith(".parquet"):
        if "text" not in pq.read_schema(file).names:
            raise ValueError(f"{file} has no 'text' column (columns: {pq.read_schema(file).names})")
        return pq.read_table(file, columns=["text"], memory_map=not keep_in_memory)
    source = pa.memory_map(file) if not keep_in_memory else pa.OSFile(file)
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:  # `datasets` writes Arrow streams, not files
        source = pa.memory_map(file) if not keep_in_memory else pa.OSFile(file)
        return pa.ipc.open_stream(source).read_all()


def load_local_texts(path: str, keep_in_memory: bool = False) -> Sequence[str]:
    """Documents of a local file or directory: .txt (documents separated by blank lines), .jsonl/.json
    (one object per line with a `text` field), .parquet and .arrow (column `text`)."""
    import pyarrow as pa

    texts: list[str] = []
    tables = []
    for file in _local_files(path):
        if file.endswith(".txt"):
            with open(file, encoding="utf-8") as f:
                texts.extend(doc.strip() for doc in f.read().split("\n\n") if doc.strip())
        elif file.endswith((".jsonl", ".json")):
            with open(file, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or "text" not in record:
                        raise ValueError(f"{file}:{line_no}: expected a JSON object with a 'text' field")
                    texts.append(record["text"])
        else:
            table = _read_arrow_file(file, keep_in_memory)
            if "text" not in table.column_names:
                raise ValueError(f"{file} has no 'text' column (columns: {table.column_names})")
            tables.append(table.select(["text"]))
    if tables:
        texts_table = pa.table({"text": pa.array(texts, pa.string())})
        merged = pa.concat_tables([texts_table, *(t.cast(texts_table.schema) for t in tables)])
        return ArrowText(merged.column("text"))
    if not texts:
        raise ValueError(f"the data files under {path} hold no documents")
    return texts


def split_train_test(data: Sequence, test_per: float, seed: int = TEST_SPLIT_SEED) -> tuple[Sequence, Sequence]:
    """A seeded held-out fraction (the seed: 0.1 % with seed 123); at least one test document."""
    if len(data) < 2:
        raise ValueError(f"a dataset of {len(data)} document(s) cannot hold one out for testing; at least 2 are needed")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator).tolist()
    num_test = min(len(data) - 1, max(1, round(test_per * len(data))))  # and at least one to train on
    return Subset(data, order[num_test:]), Subset(data, order[:num_test])


def _load_hub_dataset(name: str, test_per: float, keep_in_memory: bool):
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(
            f"--dataset {name} needs the `datasets` package (pip install datasets) and network access; "
            "omit --dataset to train on the built-in offline corpus, or pass a local directory of files"
        ) from err
    config, test_split = HUB_DATASETS[name]
    try:
        if test_split:
            train = datasets.load_dataset(name, config, split="train", keep_in_memory=keep_in_memory)
            test = datasets.load_dataset(name, config, split=test_split, keep_in_memory=keep_in_memory)
        else:
            full = datasets.load_dataset(name, config, split="train", keep_in_memory=keep_in_memory)
            parts = full.train_test_split(test_size=test_per, seed=TEST_SPLIT_SEED)
            train, test = parts["train"], parts["test"]
    except Exception as err:
        raise RuntimeError(f"could not load the hub dataset {name} (is the hub reachable?): {err}") from err
    return ArrowText(train.data.column("text")), ArrowText(test.data.column("text"))


def check_dataset_arg(dataset: str | None) -> None:
    """Fail before anything is built when --dataset names neither a hub dataset nor an existing path."""
    if dataset in (None, BUILTIN) or dataset in HUB_DATASETS or os.path.exists(dataset):
        return
    raise ValueError(
        f"--dataset {dataset!r}: no such file or directory, and not one of the hub datasets "
        f"{', '.join(HUB_DATASETS)}. Omit it (or pass '{BUILTIN}') for the built-in offline corpus."
    )


def load_text_dataset(dataset: str | None, test_per: float, keep_in_memory: bool = False):
    """(train, test) document sequences for --dataset: None/"builtin", a hub name, or a local path."""
    check_dataset_arg(dataset)
    if dataset in (None, BUILTIN):
        return split_train_test(BuiltinCorpus("train"), test_per)
    if dataset in HUB_DATASETS:
        return _load_hub_dataset(dataset, test_per, keep_in_memory)
    return split_train_test(load_local_texts(dataset, keep_in_memory), test_per)


# ----------------------------------------------------------------------------------------------------
# Batching and sampling


def collate(texts: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) as the seed batches: BOS + text truncated to seq_len + 1 tokens, right-padded
    with EOS to the longest sequence rounded up to a multiple of 128 (capped at seq_len + 1);
    inputs = tokens[:-1], labels = tokens[1:] with -100 on padding."""
    encoded = tokenizer(texts, truncation=True, max_length=seq_len + 1, add_special_tokens=True)["input_ids"]
    longest = max(len(ids) for ids in encoded)
    width = min(seq_len + 1, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    tokens = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(texts), width), dtype=torch.bool)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        valid[row, : len(ids)] = True
    labels = tokens[:, 1:].masked_fill(~valid[:, 1:], -100)
    return tokens[:, :-1].contiguous(), labels


class RandomSampler:
    """Global batches of document indices drawn uniformly with replacement; every rank draws the same
    global batch and keeps its slice, so the data does not depend on the number of ranks."""

    def __init__(self, num_docs: int, seed: int):
        self.num_docs = num_docs
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self, global_batch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        indices = torch.randint(self.num_docs, (global_batch,), generator=self.generator)
        self.batches_drawn += 1
        per_rank = global_batch // world_size
        return indices[rank * per_rank : (rank + 1) * per_rank].tolist()

    def state_dict(self) -> dict:
        return {"generator_state": self.generator.get_state(), "batches_drawn": self.batches_drawn, "num_docs": self.num_docs}

    def load_state_dict(self, state: dict) -> None:
        if state["num_docs"] != self.num_docs:
            raise ValueError(f"the checkpointed sampler drew from {state['num_docs']} documents, this dataset has {self.num_docs}")
        self.generator.set_state(state["generator_state"])
        self.batches_drawn = state["batches_drawn"]


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Maintenance of the built-in data.")
    parser.add_argument("command", choices=["build-tokenizer", "sample"])
    parser.add_argument("--out", default=TOKENIZER_DIR)
    args = parser.parse_args(argv)
    if args.command == "build-tokenizer":
        tok = build_builtin_tokenizer(args.out)
        print(f"wrote a tokenizer of {len(tok)} tokens to {args.out}")
    else:
        for i in range(8):
            print(repr(builtin_document(i)[:300]))


if __name__ == "__main__":
    _main()
