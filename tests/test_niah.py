"""NIAH end to end on a tiny saved model, the seed's row selection and scoring, the heatmap."""
import json
import re

import numpy as np
import pytest

from GPT_Trainer.data import load_tokenizer
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA
from niah_and_hs import niah, niah_heatmap

from helpers import tiny_two_layer_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A randomly initialised tiny 2Mamba saved as the trainer does: save_pretrained + tokenizer files."""
    path = tmp_path_factory.mktemp("models") / "tiny_2mamba"
    model, tokenizer = tiny_two_layer_model(512)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_niah(saved_model, out, *extra):
    niah.main(["--model_path", saved_model, "--builtin", "--context_lengths", "300", "600", "--num_evals", "4",
               "--device", "cpu", "--out", str(out), *extra])
    with open(out) as f:
        return json.load(f)


def test_niah_end_to_end_writes_results(saved_model, tmp_path):
    result = run_niah(saved_model, tmp_path / "eff.json")
    assert result["attention_type"] == TWO_MAMBA and result["source"] == "builtin"
    assert [r["context_length"] for r in result["per_length"]] == [300, 600]
    assert sum(r["total"] for r in result["per_length"]) == result["overall"]["total"] == 4
    for r in result["per_length"]:
        assert r["accuracy"] == r["correct"] / r["total"]
        assert 0 < r["mean_prompt_tokens"] < r["context_length"]
    assert result["settings"]["efficient"] and result["settings"]["num_evals"] == 4
    full = run_niah(saved_model, tmp_path / "full.json", "--no_efficient")
    assert full["per_length"] == result["per_length"] and not full["settings"]["efficient"]


def test_scoring_counts_the_right_pass_keys(saved_model, monkeypatch):
    """A stand-in generator that answers from the prompt (all 10 tokens, as a model that does not stop) scores
    1; one that answers wrongly scores 0."""
    tokenizer = load_tokenizer(saved_model)
    rows = niah.select_rows(niah.builtin_rows([300, 600], 6), 6)

    def oracle(offset):
        def fake_generate(model, tok, prompts, max_new_tokens, **kwargs):
            keys = [int(re.search(r"pass key is (\d+)\.", tok.decode(p)).group(1)) + offset for p in prompts]
            text = " {k}. Remember it. {k} is the pass key."
            return [tok(text.format(k=k), add_special_tokens=False)["input_ids"][:max_new_tokens] for k in keys]
        return fake_generate

    monkeypatch.setattr(niah, "generate", oracle(0))
    tally = niah.evaluate(None, tokenizer, rows, batch_size=4, progress=False)
    assert {n: (e["correct"], e["total"]) for n, e in tally.items()} == {300: (3, 3), 600: (3, 3)}
    monkeypatch.setattr(niah, "generate", oracle(1))
    assert all(e["correct"] == 0 for e in niah.evaluate(None, tokenizer, rows, progress=False).values())


def test_row_selection_follows_the_seed(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": i, "context_length": 1024 * (1 + i % 40)} for i in range(60)]
    path = tmp_path / "niah.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = niah.load_local_rows(str(path))
    picked = niah.select_rows(loaded, 20)
    np.random.seed(420)
    order = np.arange(60)
    np.random.shuffle(order)
    expected = [rows[i] for i in order if rows[i]["context_length"] < 32768][:20]
    assert picked == expected
    assert all(r["context_length"] < 32768 for r in picked)
    with pytest.raises(ValueError, match="columns"):
        path.write_text(json.dumps({"text": "x"}) + "\n")
        niah.load_local_rows(str(path))


def test_predicted_key_scores_as_the_original():
    """The last 10 tokens of prompt + answer, decoded; the digits of the text before the first space."""
    tok = load_tokenizer(None)
    prompt = tok.encode("What is the pass key? The pass key is", add_special_tokens=False)
    full = tok.encode(" 9330. Remember it. 9330 is the pass key. The grass", add_special_tokens=False)[:10]
    assert len(full) == 10
    assert niah.predicted_key(tok, prompt, full, 10) == "9330"
    # an answer ending in EOS early: the window reaches back into the prompt, whose words hold no digits
    short = tok.encode(" 9330", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode((prompt + short[:-1])[-10:]).endswith("is 9330")
    assert niah.predicted_key(tok, prompt, short, 10) == ""


def test_heatmap_renders_results_and_paper_figure(saved_model, tmp_path):
    first = run_niah(saved_model, tmp_path / "a.json")
    second = dict(first, per_length=[dict(first["per_length"][0], context_length=1200, accuracy=0.5)])
    (tmp_path / "b.json").write_text(json.dumps(second))
    labels, columns, values = niah_heatmap.table_from_results([tmp_path / "a.json", tmp_path / "b.json"], ["A", "B"])
    assert labels == ["A", "B"] and len(columns) == 3 and "tokens" in columns[0]
    assert values[1, 2] == 0.5 and np.isnan(values[1, 0]) and values[0, 0] == first["per_length"][0]["accuracy"]
    niah_heatmap.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "ours")])
    niah_heatmap.main(["--out", str(tmp_path / "paper")])
    for name in ("ours", "paper"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert (tmp_path / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    labels, columns, values = niah_heatmap.paper_table()
    assert labels == ["Mamba-2", "Softmax", "2Mamba"] and values.shape == (3, 5) and values[2, 4] == 0.95


def test_hidden_state_memory_measured_equals_closed_form(tmp_path):
    from niah_and_hs import hidden_state_memory as hsm

    lengths = [1, 5, 33]
    measured = hsm.measure(lengths, d=64, heads=2)
    assert measured["Softmax (KV cache)"] == [4 * 2 * n * 64 for n in lengths]
    assert measured["2Mamba"] == [4 * (64 * 2080 + 2080 + 3 * 64)] * 3
    assert measured["Linear"] == [4 * (64 * 64 + 64 + 3 * 64)] * 3
    assert hsm.crossover_length(64) == 1057.75
    hsm.main(["--max_len", "48", "--points", "3", "--out", str(tmp_path / "hs")])
    assert (tmp_path / "hs.png").stat().st_size > 10_000 and (tmp_path / "hs.svg").exists()
    assert json.loads((tmp_path / "hs.json").read_text())["mismatched"] == []


def test_infer2_cli_streams_the_same_text_in_both_modes(saved_model, capsys):
    from GPT_Trainer import infer2

    outputs = []
    for extra in ([], ["--no_efficient"]):
        infer2.main(["--model_path", saved_model, "--prompt", "The sky is", "--max_new_tokens", "12", "--device", "cpu", *extra])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("The sky is") and len(outputs[0].strip()) > len("The sky is")
    infer2.main(["--model_path", saved_model, "--prompt", "The sky is", "--max_new_tokens", "5", "--sample",
                 "--top_p", "0.9", "--temperature", "0.7", "--seed", "0"])
    sampled = capsys.readouterr().out.rstrip("\n")  # seeded sampling: a continuation, and not the greedy one
    assert sampled.startswith("The sky is") and len(sampled) > len("The sky is") and not outputs[0].startswith(sampled)


def test_entry_scripts_report_bad_input_in_one_line(saved_model, tmp_path, capsys):
    from GPT_Trainer import infer2
    from GPT_Trainer.cli import run

    cases = [
        (infer2.main, ["--model_path", saved_model, "--max_new_tokens", "0"], "max_new_tokens must be >= 1"),
        (infer2.main, ["--model_path", saved_model, "--sample", "--top_p", "2"], "top_p must be in (0, 1]"),
        (infer2.main, ["--model_path", str(tmp_path / "missing")], "checkpoint directory not found"),
        (niah.main, ["--model_path", saved_model, "--builtin", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
        (niah.main, ["--model_path", saved_model, "--dataset", str(tmp_path / "none.jsonl")], "NIAH dataset not found"),
    ]
    for main, argv, message in cases:
        assert run(main, argv, prog="script") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
