"""train.py end to end on the CPU: every attention family, learning, the authors' metrics, exact resume,
2-process DDP, wandb (offline, read back from its run files), run-directory safety, errors."""
import glob
import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

from GPT_Trainer import train, trainer
from GPT_Trainer.cli import UserError
from GPT_Trainer.data import load_tokenizer
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


def resumed_metrics(run_dir, stopped_at):
    """metrics.jsonl of a run stopped after step `stopped_at` and resumed, less the one test evaluation its
    first launch made of the model it stopped with (an uninterrupted run has none at that step)."""
    records = read_metrics(run_dir)
    launch_end = [r for r in records if r["step"] == stopped_at and "test_loss" in r]
    assert len(launch_end) == 1
    return [r for r in records if r is not launch_end[0]]


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize("attention_type", ["softmax", "mamba", "linear", TWO_MAMBA, TWO_MAMBA_E])
def test_every_attention_family_trains_and_saves(tmp_path, attention_type):
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, attention_type, num_steps_test=2))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2]  # 0-based, as the authors' loop
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["data_wait_ms"] >= 0
               for r in records if "loss" in r)
    assert [r["step"] for r in records if "test_loss" in r] == [2]
    test = next(r for r in records if "test_loss" in r)
    assert {"test_perplexity", "test_loss_token_weighted"} <= set(test)
    config = json.loads((run_dir / trainer.RUN_CONFIG_FILE).read_text())
    assert config["attention_type"] == attention_type and config["seq_len"] == 32 and config["wandb_id"] is None
    assert config["model_size"] == "tiny" and config["run_name"] == "run" and config["wandb_name"] == "run"
    assert config["num_train_documents"] + config["num_test_documents"] == 100_000 and config["num_test_documents"] == 50
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
    # resumed with DataLoader workers prefetching ahead: still exactly the batches of the uninterrupted run
    train.main(tiny_args(tmp_path / "part", num_steps=6, num_steps_early_stop=6, num_steps_test=3, load_checkpoint=True,
                         num_workers=2))
    full, part = read_metrics(tmp_path / "full"), resumed_metrics(tmp_path / "part", 2)
    assert [r["step"] for r in full if "test_loss" in r] == [3, 5]  # every num_steps_test, and the last step
    assert [r["step"] for r in part] == [r["step"] for r in full]  # the resumed run appended to metrics.jsonl
    for a, b in zip(full, part):
        for key in ("loss", "lr", "test_loss", "test_perplexity", "loss_all_ranks"):
            assert a.get(key) == b.get(key), (a, b)
    with pytest.raises(UserError, match="holds a 'squared"):
        train.main(tiny_args(tmp_path / "part", "softmax", num_steps=6, num_steps_early_stop=7, load_checkpoint=True))


def equal_length_documents(path, n, tokens=20):
    """Documents of exactly `tokens` tokens (BOS included): every rank then holds as many targets as the
    others (each row: its tokens after BOS plus the first EOS), so DDP's mean of per-rank means equals the
    one-process token mean."""
    tok = load_tokenizer()
    words = "alpha beta gamma delta river stone house garden ship bird lamp road tree".split()
    g = torch.Generator().manual_seed(0)
    docs = []
    while len(docs) < n:
        text = " ".join(words[i] for i in torch.randint(len(words), (12,), generator=g))
        ids = tok(text)["input_ids"]
        if len(ids) >= tokens:
            text = tok.decode(ids[1:tokens], skip_special_tokens=True)
            if len(tok(text)["input_ids"]) == tokens:
                docs.append(text)
    with open(path, "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    equal_length_documents(tmp_path / "docs.jsonl", 64)
    common = dict(dataset=tmp_path / "docs.jsonl", num_steps_early_stop=5, num_steps_test=4, test_per=0.125)
    train.main(tiny_args(tmp_path / "one", **common))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN_PY,
                    *tiny_args(tmp_path / "two", **common)], check=True, env=env, timeout=300)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3, 4, 4]
    for a, b in zip(one, two):
        for key in ("loss_all_ranks", "test_loss_token_weighted"):  # the global means agree across world sizes
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
    saved = torch.load(run_dir / "nonfinite_batch_step7_rank0.pt", weights_only=True)
    assert saved["input_ids"].shape == saved["labels"].shape


@pytest.mark.parametrize("argv, message", [
    (["32", "r", "no_such_attention"], "softmax"),
    (["0", "r", "softmax"], "seq_len must be >= 1"),
    (["32", "r", "softmax", "--model_size", "huge"], "valid sizes: tiny, mini, small"),
    (["32", "r", "softmax", "--dataset", "/no/such/data"], "no such file or directory"),
    (["32", "r", "softmax", "--batch_size", "5"], "multiple of the number of processes"),
    (["32", "r", "softmax", "--load_checkpoint", "--checkpoint_path", "/no/such/ckpt"], "does not exist"),
])
def test_cli_errors_before_any_model_is_built(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv, world_size=2)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_flag_once_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--batch_size", "--num_steps_early_stop", "--no-use_amp", "--clipping_value", "--num_steps_test",
                 "--no-test_loss", "--load_checkpoint", "--checkpoint_path", "--tokenizer", "--wandb_mode",
                 "--no-activation_checkpointing", "--keep_dataset_in_mem", "--model_max_length", "--seed",
                 "--dataset_config", "--text_column", "--num_workers", "--num_threads", "--overwrite"):
        assert flag in text
    assert text.count("(default: 32)") == 1 and text.count("(default: True)") == 3
    assert "default: default" not in text and "SPEC" not in text and "None" not in text
    for action in train.build_parser()._actions:
        assert action.help, action.dest


WANDB_BLOCK = 32768


def read_wandb_history(run_file):
    """History rows {step: values} of a local wandb run file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, rows = open(run_file, "rb").read(), 7, b"", {}
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                items = {k: v for k, v in items.items() if not k.startswith("_")}
                rows[record.history.step.num] = items
    return rows


def without_wandb_mode(argv):
    i = argv.index("--wandb_mode")
    return argv[:i] + argv[i + 2 :]


def test_wandb_offline_logs_the_authors_metrics_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train.main(without_wandb_mode(tiny_args(run_dir, num_steps=4, num_steps_early_stop=3, num_steps_test=2, log_steps=2)))
    config = json.loads((run_dir / trainer.RUN_CONFIG_FILE).read_text())
    assert config["wandb_mode"] == "offline" and config["wandb_id"]
    assert torch.load(run_dir / "config.pt", weights_only=True)["wandb_id"] == config["wandb_id"]
    files = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{config['wandb_id']}" / "run-*.wandb"))
    history = read_wandb_history(files[0])
    assert sorted(history) == [0, 2]
    assert set(history[0]) >= {"loss", "perplexity", "lr"} and "test_loss" not in history[0]
    assert {"test_loss", "test_perplexity", "loss", "lr"} <= set(history[2])
    local = {}
    for record in read_metrics(run_dir):
        local.setdefault(record["step"], {}).update(record)
    for step, row in history.items():
        for key, value in row.items():
            assert value == pytest.approx(local[step][key]), (step, key)
    assert history[2]["perplexity"] == pytest.approx(math.exp(history[2]["loss"]))
    # the authors' definition: rank 0's summed loss over the window / log_steps (step 0: one step / log_steps)
    assert history[0]["loss"] == pytest.approx(local[0]["loss_all_ranks"] / 2)

    train.main(without_wandb_mode(tiny_args(run_dir, num_steps=4, num_steps_early_stop=4, num_steps_test=2, log_steps=2,
                                            load_checkpoint=True)))
    assert json.loads((run_dir / trainer.RUN_CONFIG_FILE).read_text())["wandb_id"] == config["wandb_id"]
    resumed = sorted(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{config['wandb_id']}" / "run-*.wandb")))
    assert len(resumed) == 2  # the same run id, continued


def test_resume_restores_the_checkpoints_settings_unless_given(tmp_path):
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, num_steps=50, num_steps_early_stop=2, learning_rate=2e-3, warmup_steps=3,
                         test_loss=False))
    argv = [a for a in tiny_args(run_dir, num_steps_early_stop=3, test_loss=False, load_checkpoint=True)
            if a not in ("--learning_rate", "0.001", "--warmup_steps", "2", "--num_steps", "100")]
    train.main(argv + ["--warmup_steps", "4"])
    config = json.loads((run_dir / trainer.RUN_CONFIG_FILE).read_text())
    assert config["learning_rate"] == 2e-3 and config["num_steps"] == 50  # from the checkpoint
    assert config["warmup_steps"] == 4  # given on the command line
    assert set(config["restored_from_checkpoint"]) == {"learning_rate", "num_steps"}
    assert config["resumed_from_step"] == 2


def test_an_existing_run_is_never_replaced_silently(tmp_path):
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, num_steps_early_stop=1, test_loss=False))
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="already holds a run.*--overwrite"):
        train.main(tiny_args(run_dir, num_steps_early_stop=1, test_loss=False))
    assert (run_dir / "metrics.jsonl").read_text() == before
    result = subprocess.run([sys.executable, TRAIN_PY, *tiny_args(run_dir, num_steps_early_stop=1)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "already holds a run" in result.stderr and "Traceback" not in result.stderr
    train.main(tiny_args(run_dir, num_steps_early_stop=2, test_loss=False, overwrite=True))
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1]


def test_a_finished_schedule_saves_nothing_and_says_so(tmp_path, capsys):
    train.main(tiny_args(tmp_path / "run", num_steps_early_stop=2, test_loss=False))
    capsys.readouterr()
    train.main(tiny_args(tmp_path / "new", num_steps_early_stop=2, test_loss=False, load_checkpoint=True,
                         checkpoint_path=tmp_path / "run"))
    out = capsys.readouterr().out
    assert "nothing to train" in out and "no model was saved" in out and "saved the model" not in out
    assert not (tmp_path / "new" / "model.safetensors").exists()


def test_a_broken_config_json_is_reported_as_such(tmp_path):
    train.main(tiny_args(tmp_path / "run", num_steps_early_stop=1, test_loss=False))
    (tmp_path / "run" / "config.json").write_text("{broken")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        train.main(tiny_args(tmp_path / "run", num_steps_early_stop=2, test_loss=False, load_checkpoint=True))


def test_cpu_threads_default_and_flag(monkeypatch):
    cfg = train.parse_args(["8", "r", "softmax", "--dev", "cpu"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    try:
        assert train.set_threads(cfg) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert train.set_threads(cfg) == 2
        cfg.num_threads = 1
        assert train.set_threads(cfg) == 1
        cfg.num_threads = 2
        assert train.set_threads(cfg) == 2
    finally:
        torch.set_num_threads(before)
