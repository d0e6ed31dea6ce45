"""Tokenizer, built-in corpus, local datasets, seed batching and the checkpointable sampler."""
import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
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


def test_builtin_tokenizer_rebuild_is_deterministic(tmp_path):
    data.build_builtin_tokenizer(str(tmp_path))
    with open(f"{data.TOKENIZER_DIR}/tokenizer.json") as f:
        shipped = json.load(f)
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    assert rebuilt["model"]["merges"] == shipped["model"]["merges"]


def test_builtin_corpus_is_deterministic_and_split():
    assert data.builtin_document(5) == data.builtin_document(5)
    assert data.builtin_document(5, "train") != data.builtin_document(5, "test")
    kinds = [data.builtin_document(i) for i in range(200)]
    assert any("pass key is" in d for d in kinds) and any(d.startswith("Counting") for d in kinds)
    assert any(" plus " in d for d in kinds)
    train, test = data.load_text_dataset(None, test_per=0.001)
    assert len(test) == 100 and len(train) + len(test) == data.BUILTIN_NUM_DOCS
    assert not set(train.indices) & set(test.indices)


def test_collate_follows_the_seed(tokenizer):
    long_text = "one two three " * 200
    inputs, labels = data.collate([long_text, "hi"], tokenizer, seq_len=300)
    assert inputs.shape == labels.shape == (2, 300)  # 301 tokens rounded up to 384, capped at seq_len + 1
    inputs, labels = data.collate(["a short one", "hi"], tokenizer, seq_len=1000)
    assert inputs.shape == (2, 127)  # padded to 128 tokens, minus the shift
    assert inputs[0, 0] == tokenizer.bos_token_id
    n = len(tokenizer("hi")["input_ids"])
    assert (labels[1, : n - 1] != -100).all() and (labels[1, n - 1 :] == -100).all()
    assert (inputs[1, n:] == tokenizer.eos_token_id).all()


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    pq.write_table(pa.table({"text": ["fifth"], "id": [1]}), tmp_path / "c.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink:
        table = pa.table({"text": ["sixth"]})
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    docs = data.load_local_texts(str(tmp_path))
    assert sorted(docs[i] for i in range(len(docs))) == sorted(["first doc", "second doc", "third", "fourth", "fifth", "sixth"])


def test_local_errors(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        data.load_local_texts(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no data files"):
        data.load_local_texts(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no such file or directory"):
        data.check_dataset_arg(str(tmp_path / "missing"))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_dataset_without_datasets_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs the `datasets` package"):
        data.load_text_dataset("HuggingFaceFW/fineweb", 0.001)


def test_sampler_state_round_trip():
    sampler = data.RandomSampler(1000, seed=7)
    sampler.next_batch(8)
    state = sampler.state_dict()
    expected = [sampler.next_batch(8) for _ in range(3)]
    restored = data.RandomSampler(1000, seed=99)
    restored.load_state_dict(state)
    assert [restored.next_batch(8) for _ in range(3)] == expected
    # Ranks slice one global batch: together they see what one process sees.
    whole = data.RandomSampler(1000, 3).next_batch(8)
    assert data.RandomSampler(1000, 3).next_batch(8, 0, 2) + data.RandomSampler(1000, 3).next_batch(8, 1, 2) == whole
    with pytest.raises(ValueError, match="documents"):
        data.RandomSampler(5, 0).load_state_dict(state)
    assert all(torch.is_tensor(v) or isinstance(v, int) for v in state.values())
