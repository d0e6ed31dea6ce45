"""Tokenizers (built-in, sentencepiece, hub fallback), datasets through `datasets` (local data on the hub
code path, the authors' split), the authors' batching, the resumable batch sampler and the DataLoader."""
import io
import json

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch

from GPT_Trainer import data


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer()


def test_builtin_tokenizer_llama_conventions(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "right"
    assert 900 <= len(tokenizer) <= 2048
    ids = tokenizer("The pass key is 90417.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert [t for t in tokens if t.isdigit()] == list("90417")  # one token per digit
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The pass key is 90417."


def test_tokenizer_round_trips_through_a_directory(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = data.load_tokenizer(str(tmp_path))
    text = data.builtin_document(3)
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_bad_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not load a tokenizer from the directory"):
        data.load_tokenizer(str(tmp_path))


def write_sentencepiece_checkpoint_files(directory):
    """A real sentencepiece model (tiny vocabulary) saved as the authors' checkpoints hold Llama-2's: only
    tokenizer.model, tokenizer_config.json and special_tokens_map.json (no tokenizer.json)."""
    docs = [f"The quick brown fox number {i} jumps over the lazy dog {i * 7} times." for i in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=model, vocab_size=320, model_type="bpe", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True, minloglevel=2, num_threads=1,
    )
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False, "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "model_max_length": 8193,
    }))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}))
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_sentencepiece_only_directory_loads(tmp_path):
    sp = write_sentencepiece_checkpoint_files(tmp_path / "ckpt")
    tok = data.load_tokenizer(str(tmp_path / "ckpt"))
    text = "The lazy fox 1234 jumps."
    ids = tok(text)["input_ids"]
    assert ids == [1] + sp.encode(text)  # BOS, then exactly sentencepiece's pieces
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.padding_side == "right"
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == 320


def test_checkpoint_without_tokenizer_falls_back_to_llama2_and_says_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub is unreachable here
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.TokenizerUnavailable) as err:
        data.load_tokenizer(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "holds no tokenizer files" in message and "meta-llama/Llama-2-7b-hf" in message
    assert "no token" in message
    (tmp_path / ".env").write_text("hf_secret\n")  # the authors' .env holds the bare token
    assert data.hub_token() == "hf_secret"
    (tmp_path / ".env").write_text("HF_TOKEN=hf_other\n")
    assert data.hub_token() == "hf_other"


def test_builtin_corpus_is_deterministic_and_split():
    assert data.builtin_document(5) == data.builtin_document(5)
    assert data.builtin_document(5, "train") != data.builtin_document(5, "test")
    kinds = [data.builtin_document(i) for i in range(200)]
    assert any("pass key is" in d for d in kinds) and any(d.startswith("Counting") for d in kinds)
    assert any(" plus " in d for d in kinds)
    train, test = data.load_text_dataset(None, test_per=0.001)
    assert len(test) == 100 and len(train) + len(test) == data.BUILTIN_NUM_DOCS
    assert not set(train.indices) & set(test.indices)


def test_collate_follows_the_authors(tokenizer):
    long_text = "one two three " * 200
    inputs, labels = data.collate([long_text, long_text], tokenizer, seq_len=300)
    assert inputs.shape == labels.shape == (2, 300)  # min(300, 128 * ceil(longest / 128)) + 1 tokens, shifted
    assert labels[0, -1] == -100 and (labels[1] != -100).all()  # no padding anywhere: row 0 loses its last target
    inputs, labels = data.collate(["a short one", "hi"], tokenizer, seq_len=1000)
    assert inputs.shape == (2, 128)  # 129 tokens, minus the shift
    assert inputs[0, 0] == tokenizer.bos_token_id
    n = len(tokenizer("hi")["input_ids"])
    assert (labels[1, : n - 1] != -100).all()
    assert labels[1, n - 1] == tokenizer.eos_token_id  # the first EOS after the document is a target
    assert (labels[1, n:] == -100).all() and (inputs[1, n:] == tokenizer.eos_token_id).all()
    text = "x " * 70
    n = len(tokenizer(text)["input_ids"])
    assert 128 < n <= 256
    assert data.collate([text], tokenizer, seq_len=1000)[0].shape[1] == 256  # 256 + 1 tokens, minus the shift


def write_corpus(directory, n=200):
    texts = [f"document number {i}: " + "word " * (i % 17) for i in range(n)]
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(n))})
    ds.save_to_disk(str(directory))
    return ds


def test_saved_dataset_is_split_as_the_authors_with_disjoint_documents(tmp_path):
    written = write_corpus(tmp_path / "corpus")
    train, test = data.load_text_dataset(str(tmp_path / "corpus"), test_per=0.05)
    expected = written.train_test_split(test_size=0.05, seed=123)
    assert train.dataset["id"] == expected["train"]["id"] and test.dataset["id"] == expected["test"]["id"]
    train_ids, test_ids = set(train.dataset["id"]), set(test.dataset["id"])
    assert len(test_ids) == 10 and not train_ids & test_ids and train_ids | test_ids == set(range(200))
    assert test[0] == written[test.dataset["id"][0]]["text"]  # indexing honours the split's indices
    assert len({test[i] for i in range(len(test))} & {train[i] for i in range(len(train))}) == 0


def test_hub_code_path_on_local_parquet(tmp_path, monkeypatch):
    """A hub name goes through datasets.load_dataset(name, config, split="train") and the authors' split;
    SlimPajama brings its own test split. The hub is replaced by local parquet files written by `datasets`."""
    rows = {"content": [f"doc {i} " + "x " * (i % 5) for i in range(100)], "id": list(range(100))}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_dict({"content": ["held out"], "id": [1000]}).to_parquet(str(tmp_path / "test.parquet"))
    calls, real_load = [], datasets.load_dataset

    def fake_hub(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return real_load("parquet", data_files=str(tmp_path / f"{split}.parquet"), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    train, test = data.load_text_dataset("someone/any_text_dataset", 0.1, dataset_config="en", text_column="content")
    assert calls == [("someone/any_text_dataset", "en", "train")]
    assert not set(train.dataset["id"]) & set(test.dataset["id"]) and len(test) == 10
    calls.clear()
    train, test = data.load_text_dataset("HuggingFaceFW/fineweb", 0.1, text_column="content")
    assert calls == [("HuggingFaceFW/fineweb", "CC-MAIN-2024-51", "train")]
    calls.clear()
    train, test = data.load_text_dataset("gmongaras/SlimPajama-627B_Reupload", 0.1, text_column="content")
    assert [c[2] for c in calls] == ["train", "test"] and len(train) == 100 and test.dataset["id"] == [1000]
    with pytest.raises(ValueError, match="no 'text' column.*--text_column"):
        data.load_text_dataset("someone/any_text_dataset", 0.1)


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    pq.write_table(pa.table({"text": ["fifth"], "id": [1]}), tmp_path / "c.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink:
        table = pa.table({"text": ["sixth"]})
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    train, test = data.load_text_dataset(str(tmp_path), test_per=0.2)
    docs = [train[i] for i in range(len(train))] + [test[i] for i in range(len(test))]
    assert sorted(docs) == sorted(["first doc", "second doc", "third", "fourth", "fifth", "sixth"])


def test_local_errors(tmp_path):
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        data.load_text_dataset(str(tmp_path), 0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no data files"):
        data.load_text_dataset(str(tmp_path / "empty"), 0.5)
    with pytest.raises(ValueError, match="no such file or directory"):
        data.check_dataset_arg(str(tmp_path / "missing"))
    data.check_dataset_arg("someone/any_hub_dataset")  # any hub name is accepted


def test_batch_sampler_is_a_function_of_seed_and_batch_number():
    whole = data.RandomBatchSampler(1000, 8, seed=3)
    stream = iter(whole)
    first = [next(stream) for _ in range(5)]
    resumed = iter(data.RandomBatchSampler(1000, 8, seed=3, start=2))
    assert [next(resumed) for _ in range(3)] == first[2:]  # starting at batch 2 replays nothing, skips nothing
    halves = [iter(data.RandomBatchSampler(1000, 8, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert next(halves[0]) + next(halves[1]) == first[0]  # ranks slice one global batch
    assert next(iter(data.RandomBatchSampler(1000, 8, seed=4))) != first[0]
    state = whole.state_dict(batches_drawn=5)
    with pytest.raises(ValueError, match="num_docs"):
        data.RandomBatchSampler(999, 8, seed=3).check_state(state)


def test_eval_batches_match_distributed_sampler():
    one = data.eval_batches(10, 4, 0, 1, epoch=20)
    assert [len(b) for b in one] == [4, 4, 2] and sorted(sum(one, [])) == list(range(10))
    assert data.eval_batches(10, 4, 0, 1, epoch=20) == one and data.eval_batches(10, 4, 0, 1, epoch=30) != one
    r0, r1 = data.eval_batches(9, 2, 0, 2, epoch=0), data.eval_batches(9, 2, 1, 2, epoch=0)
    seen = sum(r0, []) + sum(r1, [])
    assert len(seen) == 8 and len(set(seen)) == 8  # drop_last: 4 documents per rank, none shared


def test_loader_with_workers_gives_the_same_batches(tokenizer):
    docs = [data.builtin_document(i) for i in range(50)]
    batches = {}
    for workers in (0, 2):
        loader = data.make_loader(docs, data.RandomBatchSampler(len(docs), 4, seed=1), tokenizer, 64, num_workers=workers)
        it = iter(loader)
        batches[workers] = [next(it) for _ in range(3)]
        del it
    for (a_in, a_lab), (b_in, b_lab) in zip(batches[0], batches[2]):
        assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)


def test_sentencepiece_files_without_the_package_say_so(tmp_path, monkeypatch):
    import importlib.util

    write_sentencepiece_checkpoint_files(tmp_path / "ckpt")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real_find_spec(name, *a))
    with pytest.raises(data.TokenizerUnavailable, match="pip install sentencepiece"):
        data.load_tokenizer(str(tmp_path / "ckpt"))
