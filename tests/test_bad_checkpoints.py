"""Bad checkpoint directories and NIAH data files through the entry scripts: each gives exit status 1 and one
line on stderr naming the file, builds no model, and leaves every file as it was; plus a seeded fuzz."""
import hashlib
import json
import os
import random
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from GPT_Trainer import checkpoint, cli, infer2, modeling, train
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA, TWO_MAMBA_E
from GPT_Trainer.modeling import load_model, make_config
from niah_and_hs import niah

from helpers import tiny_two_layer_model

DT_ON_VALUES = "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny 2-layer 2Mamba saved as the trainer saves it (checkpoint.save_checkpoint)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    model, tokenizer = tiny_two_layer_model(64)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint.save_checkpoint(str(run_dir), model, tokenizer, optimizer, scheduler,
                               {"attention_type": TWO_MAMBA, "model_size": "tiny", "step_ckpt": 0}, {"step": 0})
    return run_dir


@pytest.fixture
def run_dir(saved_run, tmp_path):
    """A fresh copy of the saved run to break."""
    return shutil.copytree(saved_run, tmp_path / "run")


def digests(directory) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in sorted(os.listdir(directory))}


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if a model (even one on the meta device) is constructed."""
    def refuse(self, config):
        raise AssertionError(f"a model was built from {config.to_dict()}")

    monkeypatch.setattr(modeling.TwoMambaForCausalLM, "__init__", refuse)


def run_script(main, args, capsys) -> str:
    """The script's one stderr line, after checking it exits with status 1."""
    capsys.readouterr()
    assert cli.run(main, args, prog="script") == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("script: error: "), err
    return lines[0]


def infer_fails(directory, capsys) -> str:
    before = digests(directory)
    line = run_script(infer2.main, ["--model_path", str(directory), "--device", "cpu", "--max_new_tokens", "1"], capsys)
    assert digests(directory) == before
    return line


def write_json(file, value):
    file.write_text(json.dumps(value))


def edit_config(run_dir, **fields):
    config = json.loads((run_dir / "config.json").read_text())
    config.update(fields)
    write_json(run_dir / "config.json", {k: v for k, v in config.items() if v is not None})


@pytest.mark.parametrize("content, expected", [
    ({}, "lacks hidden_size, intermediate_size, num_attention_heads, num_hidden_layers, vocab_size"),
    ([1, 2, 3], "holds a JSON list; expected a model config"),
    ("hidden_size", "holds a JSON str"),
])
def test_a_config_that_is_not_a_model_config_builds_nothing(run_dir, capsys, no_model_built, content, expected):
    write_json(run_dir / "config.json", content)
    line = infer_fails(run_dir, capsys)
    assert str(run_dir / "config.json") in line and expected in line


@pytest.mark.parametrize("fields, expected", [
    ({"hidden_size": None}, "lacks hidden_size; a model config needs hidden_size, intermediate_size"),
    ({"num_hidden_layers": 0}, "has num_hidden_layers=0; "),
    ({"vocab_size": "994"}, "has vocab_size='994'; "),
    ({"intermediate_size": 2.5}, "has intermediate_size=2.5; "),
    ({"num_attention_heads": 3}, "hidden_size 128, which num_attention_heads 3 does not divide"),
    ({"attention_type": "squared"}, "names attention_type 'squared'; known types: softmax, mamba, linear, "),
    ({"attention_type": None, "mlp_type": "relu"}, "names mlp_type 'relu'; allowed: normal, gelu"),
    ({"rms_norm_eps": -1}, "has rms_norm_eps -1; it must be a number between 0 and 1"),
    ({"tie_word_embeddings": "yes"}, "is not a valid model config: Validation error for field 'tie_word_embeddings': "),
])
def test_a_config_field_out_of_range_builds_nothing(run_dir, capsys, no_model_built, fields, expected):
    edit_config(run_dir, **fields)
    line = infer_fails(run_dir, capsys)
    assert str(run_dir / "config.json") in line and expected in line


def test_a_config_for_another_size_is_refused_before_allocating(run_dir, capsys, no_model_built):
    """The 'small' config (1024 x 20 layers) on tiny weights: refused from the headers, no model built."""
    (run_dir / "config.json").write_text(make_config("small", 64, 994, TWO_MAMBA).to_json_string())
    line = infer_fails(run_dir, capsys)
    assert "vocab_size 994 and hidden_size 1024" in line and "embedding in" in line and "[994, 128]" in line


def test_a_config_with_other_intermediate_size_names_the_shapes(run_dir, capsys):
    edit_config(run_dir, intermediate_size=512)
    line = infer_fails(run_dir, capsys)
    assert f"{run_dir / 'model.safetensors'} do not fit attention_type='{TWO_MAMBA}' of {run_dir / 'config.json'}" in line
    assert "model.layers.0.mlp.down_proj.weight [128, 256] (the config's [128, 512])" in line


def test_attention_types_that_disagree_are_named_with_their_files(run_dir, capsys):
    """2Mamba-E and 2Mamba have the same parameters: config.pt and the weights' metadata tell them apart."""
    config, pt, weights = (str(run_dir / n) for n in ("config.json", "config.pt", "model.safetensors"))
    with safe_open(weights, framework="pt") as f:
        assert f.metadata()["attention_type"] == TWO_MAMBA
    edit_config(run_dir, attention_type=TWO_MAMBA_E)
    line = infer_fails(run_dir, capsys)
    assert f"{config} says attention_type '{TWO_MAMBA_E}' but {pt} says '{TWO_MAMBA}'" in line
    torch.save({"attention_type": TWO_MAMBA_E, "model_size": "tiny"}, pt)
    line = infer_fails(run_dir, capsys)
    assert f"{config} says attention_type '{TWO_MAMBA_E}' but {weights} was saved as '{TWO_MAMBA}'" in line


def test_a_type_with_other_parameters_is_refused_from_the_shapes(run_dir, capsys):
    """No config.pt and no metadata: the dt_proj the config's type needs is missing from the weights."""
    os.remove(run_dir / "config.pt")
    save_file(load_file(run_dir / "model.safetensors"), run_dir / "model.safetensors", metadata={"format": "pt"})
    edit_config(run_dir, attention_type=DT_ON_VALUES)
    line = infer_fails(run_dir, capsys)
    assert "missing ['model.layers.0.self_attn.dt_proj.weight'" in line
    assert f"the weights' attention parameters are those of {TWO_MAMBA}, " in line


def test_a_broken_tokenizer_is_named_in_one_line(run_dir, capsys):
    (run_dir / "tokenizer.json").write_text('{"model": ')
    line = infer_fails(run_dir, capsys)
    assert str(run_dir) in line and "tokenizer" in line


def test_a_checkpoint_without_metadata_still_loads(run_dir):
    """The authors' published weights carry no attention type: the config alone decides."""
    expected = load_model(str(run_dir)).state_dict()
    save_file(load_file(run_dir / "model.safetensors"), run_dir / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(str(run_dir)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_config_pt_alone_with_a_bad_model_size(run_dir, capsys):
    os.remove(run_dir / "config.json")
    torch.save({"attention_type": TWO_MAMBA, "model_size": "huge"}, run_dir / "config.pt")
    line = infer_fails(run_dir, capsys)
    assert f"{run_dir / 'config.pt'} has model_size 'huge'" in line and "among tiny, mini, small" in line


def test_integer_weights_are_refused(run_dir, capsys):
    weights = load_file(run_dir / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].long()
    save_file(weights, run_dir / "model.safetensors", metadata={"attention_type": TWO_MAMBA})
    line = infer_fails(run_dir, capsys)
    assert "holds model.norm.weight as I64; model weights must be floating point" in line


@pytest.mark.parametrize("attention_type", [TWO_MAMBA, TWO_MAMBA_E])
def test_resuming_training_from_a_bad_checkpoint_fails_in_one_line(run_dir, capsys, attention_type):
    """An empty config.json (which once built a 7B default Llama), and config files that agree with each other
    on 2Mamba-E for weights saved as 2Mamba."""
    from test_train import tiny_args

    if attention_type == TWO_MAMBA:
        write_json(run_dir / "config.json", {})
    else:
        edit_config(run_dir, attention_type=TWO_MAMBA_E)
        torch.save({"attention_type": TWO_MAMBA_E, "model_size": "tiny"}, run_dir / "config.pt")
    before = digests(run_dir)
    line = run_script(train.main, tiny_args(run_dir, attention_type, load_checkpoint=True, checkpoint_path=str(run_dir)),
                      capsys)
    assert digests(run_dir) == before
    expected = "lacks hidden_size" if attention_type == TWO_MAMBA else f"was saved as '{TWO_MAMBA}'"
    assert str(run_dir) in line and expected in line


def niah_fails(saved_run, dataset, capsys) -> str:
    before = dataset.read_bytes()
    line = run_script(niah.main, ["--model_path", str(saved_run), "--dataset", str(dataset), "--device", "cpu",
                                  "--out", str(dataset.parent / "out.json")], capsys)
    assert dataset.read_bytes() == before and not (dataset.parent / "out.json").exists()
    return line


def test_niah_names_the_malformed_line_of_a_jsonl(saved_run, tmp_path, capsys):
    dataset = tmp_path / "niah.jsonl"
    dataset.write_text('{"prompt": "a", "answer": "1", "context_length": 100}\n\n{"prompt": "b", "answer"\n')
    line = niah_fails(saved_run, dataset, capsys)
    assert f"{dataset} line 3 is not valid JSON" in line


@pytest.mark.parametrize("content, expected", [
    ("", "has no rows"),
    ("\n\n", "has no rows"),
    ('{"prompt": "a", "answer": "1"}\n', "row 1 of {} must have the columns"),
    ('[1, 2]\n', "row 1 of {} must have the columns ('prompt', 'answer', 'context_length'); found a list"),
    ('{"prompt": "a", "answer": "1", "context_length": "long"}\n', "row 1 of {} has context_length 'long'"),
])
def test_niah_rejects_empty_and_malformed_rows(saved_run, tmp_path, capsys, content, expected):
    dataset = tmp_path / "niah.jsonl"
    dataset.write_text(content)
    line = niah_fails(saved_run, dataset, capsys)
    assert expected.format(dataset) in line and str(dataset) in line


def mutations(run_dir, rng):
    """(name, function that breaks a copy of run_dir) for the fuzz: truncations, random bytes, swaps, sizes."""
    weights, config = run_dir / "model.safetensors", run_dir / "config.json"
    text = config.read_bytes()

    header_end = 8 + int.from_bytes(weights.read_bytes()[:8], "little")

    def truncate(file, end):
        return lambda d: (d / file).write_bytes((run_dir / file).read_bytes()[:rng.randrange(end)])

    def change_header_digit(d):
        """One digit of the weights' JSON header (a shape, an offset, a layer index, the recorded type) changed."""
        data = bytearray(weights.read_bytes())
        at = rng.choice([i for i in range(8, header_end) if chr(data[i]).isdigit()])
        data[at] = ord(rng.choice([c for c in "0123456789" if c != chr(data[at])]))
        (d / "model.safetensors").write_bytes(data)

    def random_bytes(file):
        return lambda d: (d / file).write_bytes(rng.randbytes(rng.choice([0, 7, 64, 4096])))

    def swap(d):
        a, b = (d / "config.json").read_bytes(), (d / "tokenizer.json").read_bytes()
        (d / "config.json").write_bytes(b)
        (d / "tokenizer.json").write_bytes(a)

    def other_size(size):
        return lambda d: (d / "config.json").write_text(make_config(size, 64, 994, TWO_MAMBA).to_json_string())

    def layers(n):
        return lambda d: edit_config(d, num_hidden_layers=n)

    def config_pt_only(size):
        def mutate(d):
            os.remove(d / "config.json")
            torch.save({"attention_type": TWO_MAMBA, "model_size": size}, d / "config.pt")
        return mutate

    cases = [(f"truncate weights #{i}", truncate("model.safetensors", weights.stat().st_size)) for i in range(4)]
    cases += [(f"truncate weights' header #{i}", truncate("model.safetensors", header_end)) for i in range(3)]
    cases += [(f"change a header digit #{i}", change_header_digit) for i in range(12)]
    cases += [(f"truncate config #{i}", truncate("config.json", text.rindex(b"}"))) for i in range(6)]
    cases += [(f"random {name} #{i}", random_bytes(name)) for name in ("model.safetensors", "config.json", "config.pt")
              for i in range(2)]
    cases += [("swap config.json and tokenizer.json", swap), ("small config", other_size("small")),
              ("large config", other_size("large")), ("one layer", layers(1)), ("three layers", layers(3)),
              ("config.pt alone, small", config_pt_only("small")), ("config.pt alone, large_depth", config_pt_only("large_depth"))]
    return cases


def test_fuzzed_checkpoints_fail_in_one_line_and_change_nothing(saved_run, tmp_path, capsys):
    rng = random.Random(11)
    for k, (name, mutate) in enumerate(mutations(saved_run, rng)):
        directory = shutil.copytree(saved_run, tmp_path / str(k))
        mutate(directory)
        try:
            infer_fails(directory, capsys)
        except AssertionError as err:
            raise AssertionError(f"fuzz case {name!r}: {err}") from err
