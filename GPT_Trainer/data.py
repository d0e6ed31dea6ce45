"""Datasets, tokenizer and batching for training (docs/training.md, "Data" and "Batches").

Four kinds of data: any Hugging Face hub dataset with a text column (the paper used fineweb, the Pile and
SlimPajama; needs the network), local data (a directory written by `Dataset.save_to_disk`, or
txt / jsonl / parquet / arrow files), the built-in offline corpus generated here, which a tiny model
learns visibly in minutes on a CPU, and pre-tokenised directories (a manifest.json and uint16 token files,
as GPT_Trainer/docs_corpus.py writes), read as random windows with no tokenisation per step. Hub and local
data go through the same `datasets` code path as the authors' trainer: `load_dataset` / `load_from_disk`,
then `train_test_split(test_size=test_per, seed=123)` unless the dataset brings its own test split.
Training draws global batches uniformly at random with replacement; batch b is a pure function of
(seed, b), so a DataLoader can prefetch ahead with workers and a resumed run still sees exactly the batches
an uninterrupted run would.
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.utils.data

from GPT_Trainer.passkey import FILLER, passkey_example

BUILTIN = "builtin"
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")
DEFAULT_HUB_TOKENIZER = "meta-llama/Llama-2-7b-hf"
TEST_SPLIT_SEED = 123
PAD_MULTIPLE = 128

# Any hub dataset with a text column works; two of the paper's need special handling exactly as the
# authors' trainer had it: fineweb's default config, SlimPajama's own test split.
DEFAULT_CONFIGS = {"HuggingFaceFW/fineweb": "CC-MAIN-2024-51"}
OWN_TEST_SPLIT = {"gmongaras/SlimPajama-627B_Reupload": "test"}
ORIGINAL_DEFAULT_DATASET = "gmongaras/SlimPajama-627B_Reupload"  # the authors' train.py default
# Local files -> the `datasets` builder that reads them.
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
LOCAL_SUFFIXES = tuple(LOCAL_BUILDERS)

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


def train_bpe_tokenizer(texts, vocab_size: int, out_dir: str):
    """Train a byte-level BPE tokenizer on `texts` (an iterable of strings) and save it to out_dir.

    Llama-2-like conventions: <unk>=0, <s>=1 (BOS, added to every sequence), </s>=2 (EOS, also the pad
    token), and digits split into single-digit tokens so numbers are spelled digit by digit.
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
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        padding_side="right", model_max_length=1_000_000,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_builtin_tokenizer(out_dir: str = TOKENIZER_DIR, vocab_size: int = 1024, num_docs: int = 4000):
    """The project's own tokenizer (train_bpe_tokenizer) trained on the built-in corpus.
    Rebuild with `python -m GPT_Trainer.data build-tokenizer`."""
    corpus = BuiltinCorpus("train")
    return train_bpe_tokenizer((corpus[i] for i in range(num_docs)), vocab_size, out_dir)


class TokenizerUnavailable(ValueError):
    """No tokenizer could be loaded (bad directory, hub unreachable, no access): a one-line message."""


def hub_token() -> str | None:
    """A Hugging Face token from HF_TOKEN / HUGGING_FACE_HUB_TOKEN, else from ./.env as the authors' trainer
    read it (the whole file is the token; `HF_TOKEN=...` lines are accepted too)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            return os.environ[name]
    if os.path.isfile(".env"):
        with open(".env", encoding="utf-8") as f:
            text = f.read().strip()
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TOKEN"):
                return value.strip().strip("'\"") or None
        if text and "=" not in text and "\n" not in text:
            return text
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def has_tokenizer_files(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def _finish(tokenizer):
    # As the authors' trainer: pad = EOS (always), right padding.
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_directory(path: str):
    from transformers import AutoTokenizer

    if os.path.isfile(os.path.join(path, "tokenizer.model")) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        import importlib.util

        if importlib.util.find_spec("sentencepiece") is None:
            raise TokenizerUnavailable(
                f"{path} holds a sentencepiece tokenizer (tokenizer.model) and the `sentencepiece` package is not "
                "installed: pip install sentencepiece"
            )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizerUnavailable(
            f"could not load a tokenizer from the directory {path}: {first_line} "
            "(expected tokenizer.json or tokenizer.model, with tokenizer_config.json, as save_pretrained writes)"
        ) from err


def _load_hub(name: str, why: str = ""):
    from transformers import AutoTokenizer

    token = hub_token()
    try:
        return AutoTokenizer.from_pretrained(name, token=token)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        need = "" if token else " and no token (set HF_TOKEN or write it to ./.env)"
        raise TokenizerUnavailable(
            f"{why}the tokenizer {name} could not be loaded from the Hugging Face hub{need}: {first_line}. "
            f"Pass --tokenizer DIR (a directory holding tokenizer.model or tokenizer.json) or --tokenizer {BUILTIN}"
        ) from err


def load_tokenizer(name_or_path: str | None = None):
    """None or "builtin": the shipped offline tokenizer; a directory with tokenizer files (tokenizer.json, or
    the slow sentencepiece files tokenizer.model + tokenizer_config.json of the authors' checkpoints); a
    checkpoint directory without tokenizer files: the Llama-2 hub tokenizer, as the authors' code falls back
    to; otherwise a hub name (token from HF_TOKEN or ./.env). Pad = EOS, padding on the right.
    Raises TokenizerUnavailable (a ValueError) with a one-line reason.
    """
    from transformers import PreTrainedTokenizerFast

    if name_or_path in (None, BUILTIN):
        return _finish(PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR))
    if os.path.isdir(name_or_path):
        if has_tokenizer_files(name_or_path):
            return _finish(_load_directory(name_or_path))
        if os.path.isfile(os.path.join(name_or_path, "config.json")) or os.path.isfile(os.path.join(name_or_path, "config.pt")):
            return _finish(_load_hub(DEFAULT_HUB_TOKENIZER, f"the checkpoint {name_or_path} holds no tokenizer files and "))
        raise TokenizerUnavailable(
            f"could not load a tokenizer from the directory {name_or_path}: it holds neither tokenizer.json nor "
            "tokenizer.model (expected the files save_pretrained writes)"
        )
    return _finish(_load_hub(name_or_path))


def default_tokenizer_name(dataset: str | None) -> str:
    """Llama-2's (as the authors) for hub datasets; a token directory's own; the built-in one for the
    built-in corpus and other local data, so that training works with no network."""
    if is_token_dataset(dataset):
        return os.path.join(dataset, read_token_manifest(dataset)["tokenizer"])
    return BUILTIN if dataset in (None, BUILTIN) or os.path.exists(dataset) else DEFAULT_HUB_TOKENIZER


# ----------------------------------------------------------------------------------------------------
# Datasets


class TextColumn(Sequence):
    """Documents of a `datasets.Dataset` (a split: its indices mapping is honoured), read lazily by row."""

    def __init__(self, dataset, column: str = "text"):
        self.dataset, self.column = dataset, column

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.dataset[int(index)][self.column]


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
        raise ValueError(f"no data files in {path}; expected a directory written by Dataset.save_to_disk, or files "
                         f"ending in {', '.join(LOCAL_SUFFIXES)}")
    return files


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")
    )


def _select_text(ds, column: str, where: str):
    if column not in ds.column_names:
        raise ValueError(f"{where} has no {column!r} column (columns: {', '.join(ds.column_names)}); "
                         "name the text column with --text_column")


def _load_local_dataset(path: str, text_column: str, keep_in_memory: bool):
    """(train, own test split or None) from a save_to_disk directory or from data files, through `datasets`."""
    import datasets

    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(path, keep_in_memory=keep_in_memory)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path} holds the splits {', '.join(loaded)}; a 'train' split is needed")
            return loaded["train"], loaded.get("test")
        return loaded, None
    by_builder: dict[str, list[str]] = {}
    for file in _local_files(path):
        by_builder.setdefault(LOCAL_BUILDERS[os.path.splitext(file)[1]], []).append(file)
    parts = []
    for builder, files in by_builder.items():
        extra = {"sample_by": "paragraph"} if builder == "text" else {}  # documents are separated by blank lines
        part = datasets.load_dataset(builder, data_files=files, split="train", keep_in_memory=keep_in_memory, **extra)
        _select_text(part, text_column, ", ".join(files))
        part = part.select_columns([text_column])
        if builder == "text":  # paragraphs keep their newline; blank ones are no documents
            part = part.map(lambda row: {text_column: row[text_column].strip()})
            part = part.filter(lambda row: bool(row[text_column]))
        parts.append(part)
    full = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(full) == 0:
        raise ValueError(f"the data files under {path} hold no documents")
    return full, None


def _load_hub_dataset(name: str, config: str | None, keep_in_memory: bool):
    """(train, own test split or None) of a hub dataset, as the authors' trainer loads them."""
    import datasets

    config = config if config is not None else DEFAULT_CONFIGS.get(name)
    try:
        train = datasets.load_dataset(name, config, split="train", keep_in_memory=keep_in_memory)
        test = None
        if name in OWN_TEST_SPLIT:
            test = datasets.load_dataset(name, config, split=OWN_TEST_SPLIT[name], keep_in_memory=keep_in_memory)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load the hub dataset {name}"
                         f"{f' (config {config})' if config else ''}: {first_line}. Hub datasets need the network "
                         "(and HF_TOKEN for gated ones); omit --dataset for the built-in offline corpus, or pass a "
                         "local directory") from err
    return train, test


def split_hub_style(train, test, test_per: float, seed: int = TEST_SPLIT_SEED):
    """The authors' split: their own test split if the dataset has one, else
    `train_test_split(test_size=test_per, seed=123)` of the train split."""
    if test is not None:
        return train, test
    if len(train) < 2:
        raise ValueError(f"a dataset of {len(train)} document(s) cannot hold one out for testing; at least 2 are needed")
    parts = train.train_test_split(test_size=test_per, seed=seed)
    return parts["train"], parts["test"]


def split_train_test(data: Sequence, test_per: float, seed: int = TEST_SPLIT_SEED) -> tuple[Sequence, Sequence]:
    """The built-in corpus's held-out fraction (seeded; at least one test document)."""
    if len(data) < 2:
        raise ValueError(f"a dataset of {len(data)} document(s) cannot hold one out for testing; at least 2 are needed")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator).tolist()
    num_test = min(len(data) - 1, max(1, round(test_per * len(data))))  # and at least one to train on
    return Subset(data, order[num_test:]), Subset(data, order[:num_test])


def _looks_like_a_path(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1
            or name.endswith(LOCAL_SUFFIXES))


def check_dataset_arg(dataset: str | None) -> None:
    """Fail before anything is built when --dataset names a path that does not exist."""
    if dataset in (None, BUILTIN) or os.path.exists(dataset):
        return
    if _looks_like_a_path(dataset):
        raise ValueError(
            f"--dataset {dataset!r}: no such file or directory. Pass an existing directory/file, a hub dataset "
            f"name (e.g. {ORIGINAL_DEFAULT_DATASET}), or omit it (or pass '{BUILTIN}') for the built-in offline corpus."
        )


def load_text_dataset(dataset: str | None, test_per: float, keep_in_memory: bool = False,
                      dataset_config: str | None = None, text_column: str = "text"):
    """(train, test) document sequences for --dataset: None/"builtin", a local path, or any hub dataset name."""
    check_dataset_arg(dataset)
    if dataset in (None, BUILTIN):
        return split_train_test(BuiltinCorpus("train"), test_per)
    if os.path.exists(dataset):
        train, test = _load_local_dataset(dataset, text_column, keep_in_memory)
    else:
        train, test = _load_hub_dataset(dataset, dataset_config, keep_in_memory)
    _select_text(train, text_column, dataset)
    if test is not None:
        _select_text(test, text_column, f"{dataset} (test split)")
    train, test = split_hub_style(train, test, test_per)
    return TextColumn(train, text_column), TextColumn(test, text_column)


# ----------------------------------------------------------------------------------------------------
# Pre-tokenised data: a directory written by `python -m GPT_Trainer.docs_corpus build` (or anything else
# writing the same manifest): uint16 token files in which every document is <s> text </s>.

TOKEN_MANIFEST = "manifest.json"
TOKEN_FORMAT = "2mamba-tokens-v1"


def is_token_dataset(dataset: str | None) -> bool:
    return dataset not in (None, BUILTIN) and os.path.isfile(os.path.join(dataset, TOKEN_MANIFEST))


def read_token_manifest(path: str) -> dict:
    """The manifest of a token directory, checked against its files (ValueError with a one-line reason)."""
    file = os.path.join(path, TOKEN_MANIFEST)
    try:
        with open(file) as f:
            manifest = json.load(f)
        if manifest["format"] != TOKEN_FORMAT or manifest["dtype"] != "uint16":
            raise ValueError(f"format {manifest['format']!r} / dtype {manifest['dtype']!r}, expected "
                             f"{TOKEN_FORMAT!r} / 'uint16'")
        for split in ("train", "test"):
            info = manifest["splits"][split]
            size = os.path.getsize(os.path.join(path, info["file"]))
            if size != 2 * int(info["tokens"]):
                raise ValueError(f"{info['file']} holds {size} bytes, not the {info['tokens']} uint16 tokens listed "
                                 "(rebuild the corpus)")
        for key in ("tokenizer", "vocab_size"):
            if key not in manifest:
                raise KeyError(key)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); rebuild the corpus") from err
    except (KeyError, TypeError) as err:
        raise ValueError(f"{file} lacks the entry {err}; rebuild the corpus") from err
    except OSError as err:
        raise ValueError(f"{file}: {err.strerror}: {err.filename}") from err
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err
    return manifest


class TokenWindows(Sequence):
    """Windows of seq_len + 1 tokens of a uint16 token file, starting every `stride` tokens: window i is
    (inputs, labels) = (tokens[s : s + seq_len], tokens[s + 1 : s + seq_len + 1]) with s = i * stride. The
    file is memory-mapped on first use in each process, so DataLoader workers never copy it."""

    def __init__(self, file: str, num_tokens: int, seq_len: int, stride: int):
        self.file, self.num_tokens, self.seq_len, self.stride = file, num_tokens, seq_len, stride
        self._tokens = None

    def __len__(self):
        return max(0, (self.num_tokens - self.seq_len - 1) // self.stride + 1)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._tokens is None:
            self._tokens = np.memmap(self.file, dtype=np.uint16, mode="r", shape=(self.num_tokens,))
        start = int(index) * self.stride
        return torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    @staticmethod
    def collate(windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.stack(windows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def load_token_dataset(path: str, seq_len: int) -> tuple[TokenWindows, TokenWindows, dict]:
    """(train, test, manifest): training draws windows starting at every token (uniformly at random, by
    RandomBatchSampler, as it draws documents); the test split is cut into consecutive windows."""
    manifest = read_token_manifest(path)
    train, test = (manifest["splits"][split] for split in ("train", "test"))
    for split, info in (("train", train), ("test", test)):
        if info["tokens"] < seq_len + 1:
            raise ValueError(f"the {split} split of {path} holds {info['tokens']} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}")
    return (TokenWindows(os.path.join(path, train["file"]), train["tokens"], seq_len, 1),
            TokenWindows(os.path.join(path, test["file"]), test["tokens"], seq_len, seq_len), manifest)


# ----------------------------------------------------------------------------------------------------
# Batching


def collate(texts: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) exactly as the authors' `prepare_data` and loss: BOS + text; every row truncated or
    right-padded with EOS (= pad) to L = min(seq_len, 128 * ceil(longest / 128)) + 1 tokens (longest = the
    longest tokenised document of the batch); inputs = tokens[:, :-1], labels = tokens[:, 1:], and labels
    where the *input* mask is 0 become -100 -- so the first EOS after each document is a target. When no row
    has padding the authors mask the last input of row 0, which drops that one target."""
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    longest = max(len(ids) for ids in encoded)
    width = min(seq_len, PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)) + 1
    tokens = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(texts), width), dtype=torch.bool)
    for row, ids in enumerate(encoded):
        ids = ids[:width]
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        valid[row, : len(ids)] = True
    mask = valid[:, :-1].clone()
    if bool(mask.all()):
        mask[0, -1] = False
    labels = tokens[:, 1:].masked_fill(~mask, -100)
    return tokens[:, :-1].contiguous(), labels


class Collator:
    """collate() with its tokenizer bound (picklable for DataLoader workers)."""

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def __call__(self, texts):
        return collate(texts, self.tokenizer, self.seq_len)


class Documents(torch.utils.data.Dataset):
    def __init__(self, data: Sequence):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]


class RandomBatchSampler(torch.utils.data.Sampler):
    """An endless stream of this rank's slice of global batches of document indices drawn uniformly with
    replacement (as the authors' RandomSampler(replacement=True)). Global batch b depends only on
    (seed, b): every rank draws the same global batch and keeps its slice, so the data does not depend on
    the number of ranks, and starting at `start` replays nothing and skips nothing."""

    def __init__(self, num_docs: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if num_docs < 1:
            raise ValueError("the training split holds no documents")
        self.num_docs, self.global_batch, self.seed = num_docs, global_batch, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def global_indices(self, b: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_000_007 + b) % (2**63))
        return torch.randint(self.num_docs, (self.global_batch,), generator=generator)

    def batch(self, b: int) -> list[int]:
        per_rank = self.global_batch // self.world_size
        return self.global_indices(b)[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()

    def __iter__(self):
        b = self.start
        while True:
            yield self.batch(b)
            b += 1

    def state_dict(self, batches_drawn: int) -> dict:
        return {"seed": self.seed, "num_docs": self.num_docs, "global_batch": self.global_batch,
                "batches_drawn": batches_drawn}

    def check_state(self, state: dict) -> None:
        for key in ("seed", "num_docs", "global_batch"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's data sampler had {key} {state[key]}, this run has "
                                 f"{getattr(self, key)}: the batches would not continue the checkpointed run")


def eval_batches(num_docs: int, per_rank_batch: int, rank: int, world_size: int, epoch: int) -> list[list[int]]:
    """The authors' test batches: DistributedSampler(shuffle=True, drop_last=True, seed 0) with
    set_epoch(step), cut into batches of the per-rank batch size (the last one may be short)."""
    sampler = torch.utils.data.DistributedSampler(range(num_docs), num_replicas=world_size, rank=rank,
                                                  shuffle=True, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + per_rank_batch] for i in range(0, len(order), per_rank_batch)]


def make_loader(data: Sequence, batch_sampler, tokenizer, seq_len: int, num_workers: int = 0,
                pin_memory: bool = False, prefetch_factor: int = 4) -> torch.utils.data.DataLoader:
    """A DataLoader that reads and tokenises batches in `num_workers` worker processes (0: in this one),
    `prefetch_factor` batches ahead per worker, into pinned memory when training on a GPU. Pre-tokenised
    data (TokenWindows) brings its own collate."""
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after the tokenizer ran
    return torch.utils.data.DataLoader(
        Documents(data), batch_sampler=batch_sampler,
        collate_fn=data.collate if isinstance(data, TokenWindows) else Collator(tokenizer, seq_len),
        num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=False,
    )


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Maintenance of the built-in data.")
    parser.add_argument("command", choices=["build-tokenizer", "sample"], help="what to do")
    parser.add_argument("--out", default=TOKENIZER_DIR, help="where build-tokenizer writes")
    args = parser.parse_args(argv)
    if args.command == "build-tokenizer":
        tok = build_builtin_tokenizer(args.out)
        print(f"wrote a tokenizer of {len(tok)} tokens to {args.out}")
    else:
        for i in range(8):
            print(repr(builtin_document(i)[:300]))


if __name__ == "__main__":
    _main()
