"""train.py end to end on the CPU: every attention family, learning, exact resume, 2-process DDP, errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from GPT_Trainer import train, trainer
from GPT_Trainer.modeling import load_model

TWO_MAMBA = "squared__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"
TWO_MAMBA_E = "exp__sm_norm__A_mask_type_neg_softplus__in_conv_k_2"
TRAIN_PY = os.path.join(os.path.dirname(train.__file__), "train.py")


def tiny_args(run_dir, attention_type=TWO_MAMBA, seq_len=32, **flags):
    settings = dict(model_size="tiny", batch_size=4, num_steps=100, warmup_steps=2, learning_rate=1e-3, log_steps=1,
                    num_save_steps=1000, num_steps_test=1000, num_steps_early_stop=3, dev="cpu",
                    wandb_mode="disabled", model_save_path=str(run_dir), test_per=0.0005)
    settings.update(flags)
    argv = [str(seq_len), os.path.basename(str(run_dir)), attention_type]
    for name, value in settings.items():
        if value is True or value is False:
            argv.append(f"--{name}" if value else f"--no-{name}")
        else:
            argv += [f"--{name}", str(value)]
    return argv


def read_metrics(run_dir):
    with open(os.path.join(run_dir, trainer.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize("attention_type", ["softmax", "mamba", "linear", TWO_MAMBA, TWO_MAMBA_E])
def test_every_attention_family_trains_and_saves(tmp_path, attention_type):
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, attention_type, num_steps_test=2))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert [r["step"] for r in records if "test_loss" in r] == [2]
    config = json.loads((run_dir / trainer.RUN_CONFIG_FILE).read_text())
    assert config["attention_type"] == attention_type and config["seq_len"] == 32 and config["wandb_id"] is None
    assert config["model_size"] == "tiny" and config["run_name"] == "run" and config["wandb_name"] == "run"
    assert load_model(str(run_dir)).config.attention_type == attention_type
    assert torch.load(run_dir / "config.pt", weights_only=True)["step_ckpt"] == 3


def test_loss_falls_on_the_builtin_corpus(tmp_path):
    train.main(tiny_args(tmp_path / "run", seq_len=64, batch_size=8, num_steps=40, num_steps_early_stop=40,
                         learning_rate=3e-3, warmup_steps=5, test_loss=False))
    losses = list(train_losses(tmp_path / "run").values())
    assert sum(losses[-5:]) / 5 < sum(losses[1:6]) / 5 - 1.0


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    train.main(tiny_args(tmp_path / "full", num_steps=6, num_steps_early_stop=6, num_steps_test=3))
    train.main(tiny_args(tmp_path / "part", num_steps=6, num_steps_early_stop=3, num_steps_test=3))
    train.main(tiny_args(tmp_path / "part", num_steps=6, num_steps_early_stop=6, num_steps_test=3, load_checkpoint=True))
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in part] == [r["step"] for r in full]  # the resumed run appended to metrics.jsonl
    for a, b in zip(full, part):
        for key in ("loss", "lr", "test_loss"):
            assert a.get(key) == b.get(key), (a, b)
    with pytest.raises(ValueError, match="holds a 'squared"):
        train.main(tiny_args(tmp_path / "part", "softmax", num_steps=6, num_steps_early_stop=7, load_checkpoint=True))


def test_two_process_ddp_matches_one_process(tmp_path):
    words = "alpha beta gamma delta river stone house garden ship bird 12 345 6789".split()
    g = torch.Generator().manual_seed(0)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(64):  # every document is longer than seq_len: equal-length sequences on every rank
            f.write(json.dumps({"text": " ".join(words[i] for i in torch.randint(len(words), (120,), generator=g))}) + "\n")
    common = dict(dataset=tmp_path / "docs.jsonl", num_steps_early_stop=4, num_steps_test=4, test_per=0.1)
    train.main(tiny_args(tmp_path / "one", **common))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN_PY,
                    *tiny_args(tmp_path / "two", **common)], check=True, env=env, timeout=300)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "test_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (a, b)
    assert json.loads((tmp_path / "two" / trainer.RUN_CONFIG_FILE).read_text())["world_size"] == 2


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real_loss, calls = trainer.token_loss, []

    def sometimes_nan(logits, labels):
        loss, count = real_loss(logits, labels)
        calls.append(1)
        return (loss * float("nan"), count) if len(calls) == 2 or len(calls) >= 4 else (loss, count)

    monkeypatch.setattr(trainer, "token_loss", sometimes_nan)
    run_dir = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteLossError, match="5 non-finite losses in a row"):
        train.main(tiny_args(run_dir, num_steps_early_stop=20, test_loss=False))
    records = read_metrics(run_dir)
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1, 2, 3, 4, 5][: len(records)]
    assert records[1]["loss"] is None and math.isfinite(records[2]["loss"])
    saved = torch.load(run_dir / "nonfinite_batch_step8_rank0.pt", weights_only=True)
    assert saved["input_ids"].shape == saved["labels"].shape


@pytest.mark.parametrize("argv, message", [
    (["32", "r", "no_such_attention"], "softmax"),
    (["0", "r", "softmax"], "seq_len must be >= 1"),
    (["32", "r", "softmax", "--model_size", "huge"], "valid sizes: tiny, small"),
    (["32", "r", "softmax", "--dataset", "/no/such/data"], "no such file or directory"),
    (["32", "r", "softmax", "--batch_size", "5"], "multiple of the number of processes"),
    (["32", "r", "softmax", "--load_checkpoint", "--checkpoint_path", "/no/such/ckpt"], "does not exist"),
])
def test_cli_errors_before_any_model_is_built(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv, world_size=2)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_seed_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--batch_size", "--num_steps_early_stop", "--no-use_amp", "--clipping_value", "--num_steps_test",
                 "--no-test_loss", "--load_checkpoint", "--checkpoint_path", "--tokenizer", "--wandb_mode",
                 "--no-activation_checkpointing", "--keep_dataset_in_mem", "--model_max_length", "--seed"):
        assert flag in text


def test_wandb_run_id_is_recorded_and_resumed(tmp_path, monkeypatch):
    """wandb is optional and not installed here: a stand-in module records what train.py asks of it."""
    inits, logged = [], []

    class FakeRun:
        id = "abc123"

        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            pass

    fake = type(sys)("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(train, "_wandb_installed", lambda: True)
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, num_steps=4, num_steps_early_stop=2, wandb_mode="offline", test_loss=False))
    assert inits[0]["mode"] == "offline" and inits[0]["id"] is None and inits[0]["name"] == "run"
    assert [step for step, _ in logged] == [1, 2] and "loss" in logged[0][1]
    assert json.loads((run_dir / trainer.RUN_CONFIG_FILE).read_text())["wandb_id"] == "abc123"
    assert torch.load(run_dir / "config.pt", weights_only=True)["wandb_id"] == "abc123"
    with pytest.warns(UserWarning, match="holds a model with {'model_size': 'tiny'}"):  # a flag left at its default
        train.main(tiny_args(run_dir, num_steps=4, num_steps_early_stop=4, wandb_mode="offline", test_loss=False,
                             load_checkpoint=True, model_size="small"))
    assert inits[1]["id"] == "abc123" and inits[1]["resume"] == "allow"
    assert json.loads((run_dir / trainer.RUN_CONFIG_FILE).read_text())["model_size"] == "tiny"
