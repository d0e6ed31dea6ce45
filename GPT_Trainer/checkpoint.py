"""Checkpoints in the authors' layout, written atomically, and resuming from them (docs/training.md).

A run directory `models/RUN_NAME/` holds the latest checkpoint (model.safetensors + config.json,
tokenizer files, optimizer.pt, scheduler.pt, config.pt, scaler.pt, and our training_state.pt) next to
the run's logs (metrics.jsonl, run_config.json). A save writes the new checkpoint into the sibling
`.RUN_NAME.saving/`, hard-links the logs (and any other non-checkpoint file) into it, and then swaps the
two directories with two renames. Killing the process at any moment therefore leaves either the old or the
new complete directory; `recover_run_dir` finishes or undoes an interrupted swap, and is called before a
run directory is read or written. Everything is loaded with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import warnings
from dataclasses import dataclass

import torch

from GPT_Trainer.modeling import load_plain, load_training_config

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
CONFIG_FILE = "config.pt"
SCALER_FILE = "scaler.pt"
STATE_FILE = "training_state.pt"
COMPLETE_MARKER = ".checkpoint_complete"
# Files of an older checkpoint that a new save replaces rather than carries over (weights may be sharded).
_CHECKPOINT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", COMPLETE_MARKER)


def _siblings(run_dir: str) -> tuple[str, str]:
    parent, name = os.path.split(os.path.abspath(run_dir))
    return os.path.join(parent, f".{name}.saving"), os.path.join(parent, f".{name}.previous")


def recover_run_dir(run_dir: str) -> None:
    """Complete or roll back a save that was interrupted, and remove its leftovers."""
    saving, previous = _siblings(run_dir)
    if not os.path.isdir(run_dir):
        if os.path.isfile(os.path.join(saving, COMPLETE_MARKER)):
            os.rename(saving, run_dir)
        elif os.path.isdir(previous):
            os.rename(previous, run_dir)
    for leftover in (saving, previous):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same inode: a log appended after the swap lands in the new directory
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(run_dir: str, model, tokenizer, optimizer, scheduler, training_config: dict, training_state: dict,
                    scaler_state: dict | None = None) -> None:
    """Write a complete checkpoint and atomically make it the content of run_dir (rank 0 only).

    model: the unwrapped TwoMambaForCausalLM; training_config: the authors' config.pt dict (plain values);
    training_state: step, sampler and RNG states (tensors and plain values).
    """
    recover_run_dir(run_dir)
    saving, previous = _siblings(run_dir)
    os.makedirs(saving)
    model.save_pretrained(saving)
    tokenizer.save_pretrained(saving)
    torch.save(optimizer.state_dict(), os.path.join(saving, OPTIMIZER_FILE))
    torch.save(scheduler.state_dict(), os.path.join(saving, SCHEDULER_FILE))
    torch.save(training_config, os.path.join(saving, CONFIG_FILE))
    # bf16 autocast needs no loss scaling; the (empty) scaler state keeps the authors' file layout.
    torch.save(scaler_state or {}, os.path.join(saving, SCALER_FILE))
    torch.save(training_state, os.path.join(saving, STATE_FILE))
    if os.path.isdir(run_dir):
        written = set(os.listdir(saving))
        for name in os.listdir(run_dir):
            if name in written or any(fnmatch.fnmatch(name, p) for p in _CHECKPOINT_PATTERNS):
                continue
            src, dst = os.path.join(run_dir, name), os.path.join(saving, name)
            if os.path.isdir(src):
                shutil.copytree(src, dst, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
    with open(os.path.join(saving, COMPLETE_MARKER), "w"):
        pass
    if os.path.isdir(run_dir):
        os.rename(run_dir, previous)
    os.rename(saving, run_dir)
    shutil.rmtree(previous, ignore_errors=True)


class _ParamsOnly:
    """Stands in for a model when only the optimizer is known: parameters by position, no names."""

    def __init__(self, optimizer):
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def named_parameters(self):
        return [(str(i), p) for i, p in enumerate(self.params)]


@dataclass
class ResumeState:
    step: int
    wandb_id: str | None
    sampler: dict | None
    rng: dict | None
    nonfinite_steps: int


# An optimizer state lists parameters in model.parameters() order: for every module (pre-order), its own
# nn.Parameters in registration order, then its children's. The authors' LlamaDecoderLayerClean registers a
# generic attention's own parameters as A_log, dt_bias_value [1, 1, H], D and its children as rotary_emb
# (RoPE frequencies, softmax), qkv_proj, o_proj, A_mask_proj, conv1d, dt_proj, z_gate_proj, out_norm;
# ours registers dt_bias before A_log and conv1d / dt_proj before A_mask_proj, and rotary_emb last. So their
# optimizer.pt is mapped by parameter name. Everything else (embeddings, MLPs, norms, the mamba layer, which
# mirrors mamba_ssm's Mamba2) is registered in the same order by both.
ORIGINAL_OWN_ORDER = ("A_log", "dt_bias", "D")
ORIGINAL_CHILD_ORDER = ("rotary_emb", "qkv_proj", "o_proj", "A_mask_proj", "conv1d", "dt_proj", "z_gate_proj", "out_norm")


def _attention_prefix(name: str) -> str | None:
    head, sep, tail = name.partition(".self_attn.")
    if not sep or tail.startswith("mamba_layer."):
        return None
    return head + sep


def _original_rank(suffix: str) -> tuple[int, int]:
    if "." not in suffix:  # the module's own parameter
        own = ORIGINAL_OWN_ORDER
        return (0, own.index(suffix) if suffix in own else len(own))
    child = suffix.split(".", 1)[0]
    return (1, ORIGINAL_CHILD_ORDER.index(child) if child in ORIGINAL_CHILD_ORDER else len(ORIGINAL_CHILD_ORDER))


def original_parameter_order(names: list[str]) -> list[str]:
    """Our parameter names in the order the authors' model lists the same parameters."""
    out, i = [], 0
    while i < len(names):
        prefix = _attention_prefix(names[i])
        if prefix is None:
            out.append(names[i])
            i += 1
            continue
        j = i
        while j < len(names) and _attention_prefix(names[j]) == prefix:
            j += 1
        block = names[i:j]
        out.extend(sorted(block, key=lambda n: (*_original_rank(n[len(prefix):]), block.index(n))))
        i = j
    return out


def _map_by_name(state: dict, saved_names: list[str], model_names: list[str], params: list) -> dict | str:
    """The saved optimizer state re-indexed to our parameter order, or why it does not fit."""
    groups = state.get("param_groups", [])
    if len(groups) != 1:
        return f"it holds {len(groups)} parameter groups, the trainer uses 1"
    saved_ids = list(groups[0]["params"])
    if len(saved_ids) != len(model_names):
        return f"it holds {len(saved_ids)} parameters, the model has {len(model_names)}"
    position = {name: k for k, name in enumerate(model_names)}
    if sorted(saved_names) != sorted(model_names):
        return "its parameter names differ from the model's"
    new_state = {}
    for saved_id, name in zip(saved_ids, saved_names):
        ours = position[name]
        moments = dict(state.get("state", {}).get(saved_id, {}))
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensor, shape = moments[key], params[ours].shape
                if tensor.shape != shape:
                    if tensor.numel() != params[ours].numel():
                        return f"{name} has {key} of shape {tuple(tensor.shape)}, the model's is {tuple(shape)}"
                    moments[key] = tensor.reshape(shape)  # e.g. the authors' dt_bias_value [1, 1, H]
        if moments:
            new_state[ours] = moments
    return {"state": new_state, "param_groups": [{**groups[0], "params": list(range(len(model_names)))}]}


def _fit_optimizer_state(saved: dict, optimizer, model, saved_names: list[str] | None, authors: bool) -> dict | str:
    """Re-index a saved AdamW state to `optimizer` (built on model.parameters()): by the names it recorded,
    else by the registration order of whoever wrote it (the authors' or ours), trying the other on failure."""
    if not isinstance(saved, dict) or "param_groups" not in saved:
        return "not an optimizer state dict"
    named = list(model.named_parameters())
    model_names, params = [n for n, _ in named], [p for _, p in named]
    ours_in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    if len(ours_in_optimizer) != len(params) or any(a is not b for a, b in zip(ours_in_optimizer, params)):
        return "the optimizer was not built on model.parameters()"
    if saved_names is not None:
        return _map_by_name(saved, list(saved_names), model_names, params)
    orders = [original_parameter_order(model_names), model_names]
    if not authors:
        orders.reverse()
    reasons = []
    for order in orders:
        fitted = _map_by_name(saved, order, model_names, params)
        if isinstance(fitted, dict):
            return fitted
        reasons.append(fitted)
    return reasons[0]


def _fast_forward_scheduler(scheduler, step: int) -> None:
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()" does not apply here
        scheduler.step()


def restore_training_state(path: str, optimizer, scheduler, model=None) -> ResumeState:
    """Load optimizer, scheduler, step, sampler/RNG states and wandb id from a checkpoint directory.

    The model weights are loaded separately (modeling.load_model). `model` (whose parameters the optimizer
    holds) lets a saved optimizer state be matched by parameter name; the authors' optimizer.pt, written in
    their registration order, is translated. Checkpoints of the authors carry no training_state.pt: the step
    then comes from config.pt (their step_ckpt, where their loop resumes) and the missing states are reported.
    """
    recover_run_dir(path)
    config = load_training_config(path) or {}
    state_file = os.path.join(path, STATE_FILE)
    state = load_plain(state_file) if os.path.isfile(state_file) else {}
    missing = []
    if "step" in state:
        step = int(state["step"])
    elif config.get("step_ckpt") is not None:
        step = int(config["step_ckpt"])
    else:
        step = 0
        missing.append("the step (neither training_state.pt nor config.pt's step_ckpt): restarting the count at 0")

    optimizer_file = os.path.join(path, OPTIMIZER_FILE)
    if os.path.isfile(optimizer_file):
        try:
            saved = load_plain(optimizer_file)
            if model is None:
                model = _ParamsOnly(optimizer)
            fitted = _fit_optimizer_state(saved, optimizer, model, state.get("param_names"), authors=not state)
        except ValueError as err:  # unreadable without unpickling arbitrary objects
            fitted = str(err)
        if isinstance(fitted, str):
            warnings.warn(f"{optimizer_file} cannot be used ({fitted}); starting a fresh optimizer")
        else:
            optimizer.load_state_dict(fitted)
    else:
        missing.append(f"{OPTIMIZER_FILE}: fresh optimizer moments")

    scheduler_file = os.path.join(path, SCHEDULER_FILE)
    restored_scheduler = False
    if os.path.isfile(scheduler_file):
        try:
            scheduler.load_state_dict(load_plain(scheduler_file))
            restored_scheduler = scheduler.last_epoch == step
        except (KeyError, TypeError, ValueError) as err:
            warnings.warn(f"{scheduler_file} does not fit our schedule ({err})")
    else:
        missing.append(f"{SCHEDULER_FILE}")
    if not restored_scheduler:
        _fast_forward_scheduler(scheduler, step)  # the schedule is a function of the step alone

    if "sampler" not in state:
        missing.append("the data-sampler position: batches are drawn from a fresh stream")
    if "rng" not in state:
        missing.append("the random-number-generator states")
    if missing:
        warnings.warn(f"resuming from {path} at step {step} without: " + "; ".join(missing))
    return ResumeState(
        step=step, wandb_id=state.get("wandb_id", config.get("wandb_id")), sampler=state.get("sampler"),
        rng=state.get("rng"), nonfinite_steps=int(state.get("nonfinite_steps", 0)),
    )


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
