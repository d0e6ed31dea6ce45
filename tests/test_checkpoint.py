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
    """Stands for an arbitrary object pickled into a foreign optimizer.pt: never unpickled."""


def test_an_optimizer_file_that_needs_unpickling_is_refused(tmp_path, tokenizer):
    model, optimizer, scheduler = make_run(tokenizer)
    save(tmp_path / "run", tokenizer, model, optimizer, scheduler, 0)
    torch.save({"state": Pickled()}, tmp_path / "run" / checkpoint.OPTIMIZER_FILE)
    with pytest.warns(UserWarning, match="(?s)only tensors and plain values.*Pickled.*fresh optimizer"):
        checkpoint.restore_training_state(str(tmp_path / "run"), optimizer, scheduler)
