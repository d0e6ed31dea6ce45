"""Seed-layout checkpoints: files, weights_only loading, atomic saves and interrupted swaps, resuming."""
import os

import pytest
import torch

from GPT_Trainer import checkpoint
from GPT_Trainer.data import load_tokenizer
from GPT_Trainer.modeling import get_model, load_model
from GPT_Trainer.trainer import linear_warmup_decay

TWO_MAMBA = "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"
SEED_FILES = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "optimizer.pt",
              "scheduler.pt", "config.pt", "scaler.pt", checkpoint.STATE_FILE}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def make_run(tokenizer, attention_type=TWO_MAMBA):
    torch.manual_seed(0)
    model = get_model("tiny", 64, len(tokenizer), attention_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-7)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(2, 100))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n):
    for _ in range(n):
        ids = torch.randint(3, 100, (2, 16))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def save(run_dir, tokenizer, model, optimizer, scheduler, step):
    checkpoint.save_checkpoint(str(run_dir), model, tokenizer, optimizer, scheduler,
                               {"attention_type": TWO_MAMBA, "model_size": "tiny", "step_ckpt": step, "wandb_id": None},
                               {"step": step, "rng": checkpoint.rng_state(torch.device("cpu"))})


def test_layout_and_round_trip(tmp_path, tokenizer):
    model, optimizer, scheduler = make_run(tokenizer)
    train_steps(model, optimizer, scheduler, 2)
    run_dir = tmp_path / "run"
    save(run_dir, tokenizer, model, optimizer, scheduler, 2)
    assert SEED_FILES <= set(os.listdir(run_dir))
    for name in os.listdir(run_dir):
        if name.endswith(".pt"):
            torch.load(run_dir / name, weights_only=True)
    loaded = load_model(str(run_dir))
    ids = load_tokenizer(str(run_dir))("7 plus 5 is 12.", return_tensors="pt")["input_ids"]
    model.eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    model, optimizer, scheduler = make_run(tokenizer)
    run_dir = tmp_path / "run"
    save(run_dir, tokenizer, model, optimizer, scheduler, 1)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    before = load_model(str(run_dir)).state_dict()
    train_steps(model, optimizer, scheduler, 3)

    real_save = torch.save

    def dies_on_optimizer(obj, path, *a, **k):
        if str(path).endswith(checkpoint.OPTIMIZER_FILE):
            real_save(obj, path, *a, **k)
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", dies_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        save(run_dir, tokenizer, model, optimizer, scheduler, 4)
    monkeypatch.undo()
    assert os.path.isdir(checkpoint._siblings(str(run_dir))[0])  # the half-written save is left beside the run
    after = load_model(str(run_dir)).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.load(run_dir / "config.pt", weights_only=True)["step_ckpt"] == 1
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    checkpoint.recover_run_dir(str(run_dir))
    assert not any(os.path.exists(p) for p in checkpoint._siblings(str(run_dir)))


@pytest.mark.parametrize("completed", [False, True])
def test_crash_between_the_renames(tmp_path, tokenizer, monkeypatch, completed):
    """Killed after the old directory moved aside: recovery promotes the new complete save, or (if the
    kill came before the marker) restores the old one; the log survives either way."""
    model, optimizer, scheduler = make_run(tokenizer)
    run_dir = tmp_path / "run"
    save(run_dir, tokenizer, model, optimizer, scheduler, 1)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    real_rename, calls = os.rename, []

    def dies_on_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between renames")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", dies_on_second_rename)
    if not completed:  # lose the marker too: an incomplete save must never be promoted
        monkeypatch.setattr(checkpoint, "COMPLETE_MARKER", "never-written")
    with pytest.raises(KeyboardInterrupt):
        save(run_dir, tokenizer, model, optimizer, scheduler, 2)
    monkeypatch.undo()
    assert not run_dir.exists()
    checkpoint.recover_run_dir(str(run_dir))
    assert torch.load(run_dir / "config.pt", weights_only=True)["step_ckpt"] == (2 if completed else 1)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    load_model(str(run_dir))


def test_restore_and_mismatched_optimizer(tmp_path, tokenizer):
    model, optimizer, scheduler = make_run(tokenizer)
    train_steps(model, optimizer, scheduler, 3)
    save(tmp_path / "run", tokenizer, model, optimizer, scheduler, 3)
    fresh_model, fresh_opt, fresh_sched = make_run(tokenizer)
    state = checkpoint.restore_training_state(str(tmp_path / "run"), fresh_opt, fresh_sched)
    assert state.step == 3 and fresh_sched.last_epoch == 3
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    saved_moments = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], saved_moments)

    _, other_opt, other_sched = make_run(tokenizer, "softmax")  # other parameters: warn, keep a fresh optimizer
    with pytest.warns(UserWarning, match="cannot be used"):
        checkpoint.restore_training_state(str(tmp_path / "run"), other_opt, other_sched)
    assert other_opt.state_dict()["state"] == {}


def test_resume_from_an_authors_style_checkpoint(tmp_path, tokenizer):
    """Model + optimizer.pt + scheduler.pt + config.pt, no training state: step from config.pt, warnings."""
    model, optimizer, scheduler = make_run(tokenizer)
    train_steps(model, optimizer, scheduler, 4)
    run_dir = tmp_path / "authors"
    save(run_dir, tokenizer, model, optimizer, scheduler, 4)
    os.remove(run_dir / checkpoint.STATE_FILE)
    _, fresh_opt, fresh_sched = make_run(tokenizer)
    with pytest.warns(UserWarning, match="data-sampler position.*random-number-generator"):
        state = checkpoint.restore_training_state(str(run_dir), fresh_opt, fresh_sched)
    assert state.step == 4 and state.sampler is None and state.rng is None
    assert fresh_sched.get_last_lr() == pytest.approx([1e-3 * linear_warmup_decay(2, 100)(4)])


class Pickled:
    """Stands for an arbitrary object pickled into a foreign checkpoint file: never unpickled."""


def test_an_optimizer_file_that_needs_unpickling_is_refused(tmp_path, tokenizer):
    model, optimizer, scheduler = make_run(tokenizer)
    save(tmp_path / "run", tokenizer, model, optimizer, scheduler, 0)
    torch.save({"state": Pickled()}, tmp_path / "run" / checkpoint.OPTIMIZER_FILE)
    with pytest.warns(UserWarning, match="(?s)only tensors and plain values.*Pickled.*fresh optimizer"):
        checkpoint.restore_training_state(str(tmp_path / "run"), optimizer, scheduler)


# ---------------------------------------------------------------------------------------------------------
# The authors' checkpoints: their directory layout, their parameter registration order, their config.pt.

# Their LlamaDecoderLayerClean registers the 2Mamba attention as qkv_proj, o_proj, A_mask_proj, conv1d
# (ours: qkv_proj, o_proj, conv1d, A_mask_proj) and softmax's rotary_emb first (ours: last).
AUTHORS_ATTENTION_ORDER = {
    TWO_MAMBA: ["qkv_proj.weight", "o_proj.weight", "A_mask_proj.weight", "conv1d.weight", "conv1d.bias"],
    "softmax": ["rotary_emb.freqs", "qkv_proj.weight", "o_proj.weight"],
}


def authors_order(model, attention_type):
    names, out = [n for n, _ in model.named_parameters()], []
    for name in names:
        if ".self_attn." not in name:
            out.append(name)
        elif name.endswith(AUTHORS_ATTENTION_ORDER[attention_type][0]):
            prefix = name[: -len(AUTHORS_ATTENTION_ORDER[attention_type][0])]
            out.extend(prefix + suffix for suffix in AUTHORS_ATTENTION_ORDER[attention_type])
    assert sorted(out) == sorted(names)
    return out


def write_authors_checkpoint(directory, attention_type, dataset, steps=4):
    """A checkpoint laid out exactly as the authors' save_model writes it: save_pretrained weights + config
    (LlamaForCausalLM, attn_mask buffers), slow sentencepiece tokenizer files, optimizer.pt in their
    registration order, scheduler.pt, config.pt, and pickled tokenizer.pt / scaler.pt."""
    from safetensors.torch import load_file, save_file
    from test_data import write_sentencepiece_checkpoint_files

    import json

    write_sentencepiece_checkpoint_files(directory)
    torch.manual_seed(0)
    model = get_model("tiny", 64, 320, attention_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, eps=1e-7, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(3, 40))
    train_steps(model, optimizer, scheduler, steps)
    model.save_pretrained(str(directory))
    config = json.loads((directory / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (directory / "config.json").write_text(json.dumps(config))
    weights = load_file(str(directory / "model.safetensors"))
    for i in range(config["num_hidden_layers"]):
        if attention_type != "softmax":
            weights[f"model.layers.{i}.self_attn.attn_mask"] = ~torch.tril(torch.ones(64, 64)).bool()[None, None]
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})

    ours = optimizer.state_dict()
    position = {name: k for k, (name, _) in enumerate(model.named_parameters())}
    order = authors_order(model, attention_type)
    theirs = {"state": {k: ours["state"][position[name]] for k, name in enumerate(order) if position[name] in ours["state"]},
              "param_groups": [{**ours["param_groups"][0], "params": list(range(len(order)))}]}
    torch.save(theirs, directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    torch.save({"dataset": dataset, "model_size": "tiny", "learning_rate": 2e-3, "warmup_steps": 3, "num_steps": 40,
                "wandb_name": "authors_run", "log_steps": 2, "use_amp": True, "dev": "gpu",
                "attention_type": attention_type, "mlp_type": "normal", "clipping_value": None, "weight_decay": 0.01,
                "step_ckpt": steps, "wandb_id": None, "model_max_length": 64}, directory / "config.pt")
    torch.save(Pickled(), directory / "tokenizer.pt")  # their tokenizer.pt and scaler.pt pickle whole objects
    torch.save(Pickled(), directory / "scaler.pt")
    return model, optimizer


@pytest.mark.parametrize("attention_type, expected", [
    ("linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__D_res",
     ["D", "qkv_proj.weight", "o_proj.weight", "A_mask_proj.weight", "conv1d.weight", "conv1d.bias", "dt_proj.weight",
      "out_norm.weight"]),
    ("linear__output_norm__A_mask_type_discretize__in_conv_k_2",
     ["A_log", "qkv_proj.weight", "o_proj.weight", "conv1d.weight", "conv1d.bias", "dt_proj.weight", "out_norm.weight"]),
    ("linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__Z_out_gate",
     ["qkv_proj.weight", "o_proj.weight", "A_mask_proj.weight", "conv1d.weight", "conv1d.bias", "dt_proj.weight",
      "z_gate_proj.weight", "z_gate_proj.bias", "out_norm.weight"]),
    ("mamba", ["mamba_layer." + n for n in ("dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight", "norm.weight",
                                            "out_proj.weight")]),
])
def test_original_parameter_order(attention_type, expected):
    """model.parameters() lists a module's own parameters, then its children's, each in registration order;
    the expected lists follow the authors' LlamaDecoderLayerClean registration (own: A_log, dt_bias_value, D;
    children: rotary_emb, qkv_proj, o_proj, A_mask_proj, conv1d, dt_proj, z_gate_proj, out_norm)."""
    names = [n for n, _ in get_model("tiny", 16, 50, attention_type).named_parameters()]
    order = checkpoint.original_parameter_order(names)
    assert sorted(order) == sorted(names)
    assert [n.split("layers.1.self_attn.")[1] for n in order if "layers.1.self_attn." in n] == expected
    assert [n for n in order if ".self_attn." not in n] == [n for n in names if ".self_attn." not in n]


@pytest.mark.parametrize("attention_type", [TWO_MAMBA, "softmax"])
def test_authors_optimizer_state_is_mapped_by_parameter_name(tmp_path, attention_type):
    source_model, source_opt = write_authors_checkpoint(tmp_path / "authors", attention_type, None)
    model = load_model(str(tmp_path / "authors"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, eps=1e-7, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(3, 40))
    with pytest.warns(UserWarning, match="data-sampler position"):
        state = checkpoint.restore_training_state(str(tmp_path / "authors"), optimizer, scheduler, model)
    assert state.step == 4 and scheduler.last_epoch == 4
    saved = source_opt.state_dict()["state"]
    source = {name: saved.get(k) for k, (name, _) in enumerate(source_model.named_parameters())}
    restored = optimizer.state_dict()["state"]
    for k, (name, _) in enumerate(model.named_parameters()):
        assert (k in restored) == (source[name] is not None), name
        if source[name] is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(restored[k][key], source[name][key]), (name, key)


def test_resume_an_authors_checkpoint_with_their_settings(tmp_path):
    """Their config.pt's dataset, lr, warmup, schedule, log_steps and model size are restored (no --dataset
    given); the tokenizer comes from their sentencepiece files; the step count continues."""
    import datasets
    import json

    from GPT_Trainer import train

    corpus = tmp_path / "corpus"
    datasets.Dataset.from_dict({"text": [f"The quick fox {i} jumps over the dog." for i in range(40)]}).save_to_disk(str(corpus))
    write_authors_checkpoint(tmp_path / "authors", TWO_MAMBA, str(corpus))
    out = tmp_path / "continued"
    train.main(["64", "continued", TWO_MAMBA, "--load_checkpoint", "--checkpoint_path", str(tmp_path / "authors"),
                "--model_save_path", str(out), "--dev", "cpu", "--wandb_mode", "disabled", "--batch_size", "2",
                "--num_steps_early_stop", "6", "--num_steps_test", "1000"])
    config = json.loads((out / "run_config.json").read_text())
    assert config["dataset"] == str(corpus) and config["num_train_documents"] + config["num_test_documents"] == 40
    assert (config["learning_rate"], config["warmup_steps"], config["num_steps"], config["log_steps"]) == (2e-3, 3, 40, 2)
    assert config["model_size"] == "tiny" and config["wandb_name"] == "authors_run" and config["vocab_size"] == 320
    assert config["resumed_from_step"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 5] and "test_loss" in records[1]  # a log line; the final model's test
    assert records[0]["lr"] == pytest.approx(2e-3 * linear_warmup_decay(3, 40)(4))
    assert torch.load(out / "config.pt", weights_only=True)["step_ckpt"] == 6
    assert load_tokenizer(str(out))("The fox")["input_ids"] == load_tokenizer(str(tmp_path / "authors"))("The fox")["input_ids"]


def test_authors_checkpoint_without_tokenizer_and_no_hub_fails_in_one_line(tmp_path):
    """Their directories may lack tokenizer files: the Llama-2 hub tokenizer is the fallback, and when the hub
    cannot be reached train.py says so in one line (exit status 1, no traceback)."""
    import subprocess
    import sys

    from GPT_Trainer import train

    write_authors_checkpoint(tmp_path / "authors", TWO_MAMBA, "HuggingFaceFW/fineweb", steps=1)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        os.remove(tmp_path / "authors" / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    result = subprocess.run(
        [sys.executable, train.__file__, "64", "cont", TWO_MAMBA, "--load_checkpoint", "--checkpoint_path",
         str(tmp_path / "authors"), "--model_save_path", str(tmp_path / "cont"), "--dev", "cpu", "--wandb_mode",
         "disabled"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "holds no tokenizer files" in lines[0] and "meta-llama/Llama-2-7b-hf" in lines[0]
