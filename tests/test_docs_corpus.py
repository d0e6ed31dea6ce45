"""The Debian documentation corpus (GPT_Trainer/docs_corpus.py) on files written here (no apt, no network):
cleaning, de-duplication, the split by document, the tokenizer, the token files, and train.py on them."""
import json
import os
import random

import numpy as np
import pytest

from GPT_Trainer import docs_corpus as dc
from GPT_Trainer import train
from GPT_Trainer.cli import UserError
from GPT_Trainer.data import TokenWindows, load_token_dataset, load_tokenizer
from test_train import read_metrics, resumed_metrics, tiny_args  # pytest puts tests/ (no __init__.py) on sys.path

WORDS = ("the system reads each file and writes a short report about what it found before the next step begins "
         "when users open a window they see the list of packages with their names versions and sizes").split()


def prose(seed: int, sentences: int = 12) -> str:
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                    for _ in range(sentences))


def write_package(root):
    """A fake unpacked package: HTML pages with code and navigation, reST with a literal block, a duplicate
    and a stub."""
    os.makedirs(root / "html")
    for i in range(24):
        body = "".join(f"<p>{prose(100 * i + j)}</p>" for j in range(3))
        (root / "html" / f"page{i:02d}.html").write_text(
            f"<html><head><title>t</title><script>var x = 1;</script></head><body>"
            f"<div class='related'>Next page Previous page Up Home Index Search these links</div>{body}"
            f"<pre>def secret_code(x):\n    return x + 1</pre></body></html>")
    (root / "html" / "copy.html").write_text(  # page00's text, differently spaced and cased: a duplicate
        "<html><body>" + "".join(f"<p>  {prose(j).upper()} </p>" for j in range(3)) + "</body></html>")
    (root / "html" / "stub.html").write_text("<html><body><p>Too short to be a document at all.</p></body></html>")
    os.makedirs(root / "rst")
    for i in range(6):
        (root / "rst" / f"doc{i}.txt").write_text(
            f"Title {i}\n=======\n\n{prose(5000 + i)}\n\nThe example below shows the whole idea in one line::\n\n"
            f"    int literal_block = {i};\n\n"
            f".. code-block:: c\n\n   int directive_block;\n\n{prose(6000 + i)}\n")
    return [(dc.Source("fake-html", "html", ("html/*.html",)), str(root)),
            (dc.Source("fake-rst", "rst", ("rst/*.txt",)), str(root))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    out = tmp_path_factory.mktemp("corpus")
    sources = write_package(root)
    manifest = dc.build(str(out), vocab_size=400, test_fraction=0.2, seed=7, sources=sources)
    return out, manifest, sources


def split_documents(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(ids == eos)
    return [ids[start:end] for start, end in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_manifest_counts_match_the_files_and_the_split_is_by_document(corpus):
    out, manifest, _ = corpus
    docs = [json.loads(line) for line in open(out / "documents.jsonl")]
    for split in ("train", "test"):
        info = manifest["splits"][split]
        part = [d for d in docs if d["split"] == split]
        assert os.path.getsize(out / info["file"]) == 2 * info["tokens"] == 2 * sum(d["tokens"] for d in part)
        assert info["documents"] == len(part) and info["words"] == sum(d["words"] for d in part)
    train_docs = {(d["file"], d["hash"]) for d in docs if d["split"] == "train"}
    test_docs = {(d["file"], d["hash"]) for d in docs if d["split"] == "test"}
    assert not {f for f, _ in train_docs} & {f for f, _ in test_docs}
    assert not {h for _, h in train_docs} & {h for _, h in test_docs}
    assert len(test_docs) == round(0.2 * len(docs)) == 6
    html, rst = manifest["sources"]["fake-html"], manifest["sources"]["fake-rst"]
    assert (html["documents"], html["duplicates_dropped"], html["short_dropped"]) == (24, 1, 1)
    assert rst["documents"] == 6 and html["words"] + rst["words"] == sum(d["words"] for d in docs)
    assert manifest["vocab_size"] == 400 and manifest["seed"] == 7


def test_token_files_round_trip_through_the_tokenizer(corpus):
    out, manifest, sources = corpus
    tokenizer = load_tokenizer(str(out / manifest["tokenizer"]))
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (0, 1, 2, 400)
    texts = {d["hash"]: d["text"] for d in dc.collect(sources, {})[0]}
    docs = [json.loads(line) for line in open(out / "documents.jsonl")]
    for split in ("train", "test"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        pieces = split_documents(ids, tokenizer.eos_token_id)
        expected = [d for d in docs if d["split"] == split]
        assert len(pieces) == len(expected)
        for piece, doc in zip(pieces, expected):
            assert piece[0] == tokenizer.bos_token_id and len(piece) + 1 == doc["tokens"]
            assert tokenizer.decode(piece[1:].tolist()) == texts[doc["hash"]]
    every = " ".join(texts.values())
    assert "Too short" not in every and "secret_code" not in every and "var x" not in every
    assert "Previous page" not in every and "literal_block" not in every and "directive_block" not in every
    assert "The example below shows the whole idea in one line:" in every  # "::" before a literal block reads ":"


def test_the_build_is_reproducible(corpus, tmp_path):
    out, manifest, sources = corpus
    again = dc.build(str(tmp_path), vocab_size=400, test_fraction=0.2, seed=7, sources=sources)
    assert again["splits"] == manifest["splits"]
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.bin").read_bytes() == (out / f"{split}.bin").read_bytes()


def test_token_windows():
    data = np.arange(10, dtype=np.uint16)
    windows = TokenWindows("unused", 10, 3, 1)
    windows._tokens = data  # as if memory-mapped
    assert len(windows) == 7 and windows[6].tolist() == [6, 7, 8, 9]
    inputs, labels = TokenWindows.collate([windows[0], windows[2]])
    assert inputs.tolist() == [[0, 1, 2], [2, 3, 4]] and labels.tolist() == [[1, 2, 3], [3, 4, 5]]
    windows.stride = 3
    assert len(windows) == 3 and windows[2].tolist() == [6, 7, 8, 9]


def test_train_py_trains_on_the_token_files_and_resumes_exactly(corpus, tmp_path):
    out, manifest, _ = corpus
    flags = dict(dataset=str(out), num_steps=6, num_steps_test=3)
    train.main(tiny_args(tmp_path / "full", "softmax", num_steps_early_stop=6, **flags))
    train.main(tiny_args(tmp_path / "part", "softmax", num_steps_early_stop=3, **flags))
    train.main(tiny_args(tmp_path / "part", "softmax", num_steps_early_stop=6, load_checkpoint=True, num_workers=1,
                         **flags))
    full, part = read_metrics(tmp_path / "full"), resumed_metrics(tmp_path / "part", 2)
    assert [r["step"] for r in full] == [r["step"] for r in part] and any("test_loss" in r for r in full)
    for a, b in zip(full, part):
        for key in ("loss", "test_loss"):
            assert a.get(key) == b.get(key), (a, b)
    config = json.loads((tmp_path / "full" / "run_config.json").read_text())
    train_split, test_split = manifest["splits"]["train"], manifest["splits"]["test"]
    assert (config["train_tokens"], config["test_tokens"]) == (train_split["tokens"], test_split["tokens"])
    assert config["num_train_documents"] == train_split["documents"] and config["vocab_size"] == 400
    assert config["num_train_windows"] == train_split["tokens"] - 32
    assert config["num_test_windows"] == (test_split["tokens"] - 33) // 32 + 1


def test_bad_token_directories_are_one_line_errors(corpus, tmp_path):
    out, manifest, _ = corpus
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train.bin", "test.bin"):
        (bad / name).write_bytes((out / name).read_bytes())
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is not valid JSON"):
        train.main(tiny_args(tmp_path / "r1", dataset=str(bad), tokenizer=str(out / "tokenizer")))
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "test.bin").write_bytes((out / "test.bin").read_bytes()[:-2])
    with pytest.raises(UserError, match="test.bin holds .* bytes, not the"):
        train.main(tiny_args(tmp_path / "r2", dataset=str(bad), tokenizer=str(out / "tokenizer")))
    with pytest.raises(UserError, match="were written by"):
        train.main(tiny_args(tmp_path / "r3", dataset=str(out), tokenizer="builtin"))
    with pytest.raises(ValueError, match="fewer than one window"):
        load_token_dataset(str(out), manifest["splits"]["test"]["tokens"])


def test_converters_keep_prose_and_drop_code():
    assert dc.html_text("<p>One &amp; two</p><pre>x = 1</pre><table><tr><td>a</td><td>b</td></tr></table>") \
        == "One & two\n\na\n\nb"
    assert dc.html_text("<div class='navigation x'><p>menu</div><p>kept<li>too</ul>") == "kept\n\ntoo"  # unclosed tags
    pod = "=head1 NAME\n\nperlfoo - a L<link text|perlbar> and C<code>\n\n    my $x = 1;\n\n=cut\n"
    assert dc.pod_text(pod) == "NAME\n\nperlfoo - a link text and code"
    man = '.TH FOO 1\n.SH "DESCRIPTION"\n.B foo\nreads \\fIfiles\\fR \\- fast.\n.nf\ncode here\n.fi\n'
    assert dc.man_text(man) == "Description\n\nfoo reads files - fast."
    assert dc.markdown_text("# Head\n\nSee [the docs](http://x).\n\n```\ncode\n```\n") == "Head\n\nSee the docs."
    assert not dc.is_prose("for (i = 0; i < n; i++) { x[i] = y[i] * 2; }")
    assert dc.is_prose("This sentence is plain English prose with several words.")


def test_dictd_entries_are_read_in_file_order_without_source_tags(tmp_path):
    import gzip

    entries = [b"00-database-info\n   About this file, which is no entry.\n",
               b"Abbey \\Ab\"bey\\, n. A monastery. [1913 Webster]\n", b"Zebra, n. A striped horse. [WordNet 1.5]\n"]
    offsets = np.cumsum([0] + [len(e) for e in entries])
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(n):
        return digits[n // 64] + digits[n % 64]

    with gzip.open(tmp_path / "x.dict.dz", "wb") as f:
        f.write(b"".join(entries))
    words = ("00-database-info", "zebra", "abbey")  # the index is sorted by word, not by offset
    (tmp_path / "x.index").write_text("".join(f"{w}\t{b64(int(offsets[i]))}\t{b64(len(entries[i]))}\n"
                                              for w, i in zip(words, (0, 2, 1))))
    assert dc._dict_entries(str(tmp_path / "x.index")) == ['Abbey \\Ab"bey\\, n. A monastery.',
                                                           "Zebra, n. A striped horse."]
