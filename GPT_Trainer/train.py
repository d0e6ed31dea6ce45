"""Train a Llama-2 model whose attention is ATTENTION_TYPE (docs/training.md).

    torchrun --nproc_per_node=G --master-port P GPT_Trainer/train.py SEQ_LEN RUN_NAME ATTENTION_TYPE [flags]
    python GPT_Trainer/train.py SEQ_LEN RUN_NAME ATTENTION_TYPE [flags]      (one process)

Every setting of the authors' script is a flag with their default; `--help` lists them. The settings form
one typed object, `RunConfig`, written once per launch to RUN_DIR/run_config.json and read back once when a
run is resumed (the authors' config.pt is read for their checkpoints). This file checks the arguments, sets
up the processes, data, model and optimizer (or resumes them), then runs trainer.Trainer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import netrc
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field

if __package__ in (None, ""):  # `python GPT_Trainer/train.py` / torchrun: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from GPT_Trainer import checkpoint, cli
from GPT_Trainer.cli import UserError
from GPT_Trainer.data import (
    BUILTIN, ORIGINAL_DEFAULT_DATASET, RandomBatchSampler, check_dataset_arg, default_tokenizer_name,
    has_tokenizer_files, is_token_dataset, load_text_dataset, load_token_dataset, load_tokenizer,
)
from GPT_Trainer.LlamaDecoderLayerClean import attention_config
from GPT_Trainer.modeling import MODEL_SIZES, get_model, load_model, load_training_config, read_config
from GPT_Trainer.trainer import METRICS_FILE, RUN_CONFIG_FILE, Distributed, MetricsLogger, Trainer, linear_warmup_decay

WANDB_MODES = ("online", "offline", "disabled")


def _flag(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class RunConfig:
    """Every setting of a training run. Field names are the command-line flags (--name)."""

    seq_len: int = field(metadata={"positional": True,
                                   "help": "training sequence length in tokens (the paper: 2048, 4096, 8192)"})
    run_name: str = field(metadata={"positional": True, "help": "name of the run; checkpoints and logs go to models/RUN_NAME/"})
    attention_type: str = field(metadata={"positional": True,
                                          "help": "a key of `configs` in GPT_Trainer/LlamaDecoderLayerClean.py"})
    batch_size: int = _flag(32, "GLOBAL batch size, split evenly across processes")
    learning_rate: float = _flag(1e-4, "peak AdamW learning rate")
    warmup_steps: int = _flag(10_000, "linear warmup from 0, then linear decay")
    num_steps: int = _flag(1_000_000, "schedule length: the learning rate reaches 0 here")
    num_steps_early_stop: int = _flag(100_000, "stop after this many steps; the schedule is unchanged")
    dev: str = _flag("gpu", "gpu or cpu; gpu falls back to cpu (with a warning) when CUDA is unavailable",
                     choices=("gpu", "cpu"))
    num_threads: int | None = _flag(None, "CPU threads of each process (torch.set_num_threads); unset: $OMP_NUM_THREADS "
                                          "if set, else on --dev cpu the machine's cores divided among the processes "
                                          "on it, on GPUs torch's choice")
    wandb_name: str | None = _flag(None, "wandb run name (unset: RUN_NAME)")
    wandb_project: str = _flag("Mamba_Squared_Experiemnts", "wandb project")
    wandb_mode: str | None = _flag(None, "unset: $WANDB_MODE if set, else online when a wandb key is configured, "
                                         "else offline (run files under ./wandb)", choices=WANDB_MODES)
    log_steps: int = _flag(10, "log loss, perplexity and lr at steps 0, N, 2N, ... (loss: rank 0's mean over N steps)")
    use_amp: bool = _flag(True, "bf16 autocast (CUDA only; CPU runs stay in fp32)")
    dataset: str | None = _flag(None, f"unset or '{BUILTIN}': the built-in offline corpus; any Hugging Face hub dataset "
                                      f"with a text column (the authors' default: {ORIGINAL_DEFAULT_DATASET}; needs the "
                                      "network); a local directory written by Dataset.save_to_disk, or "
                                      ".txt/.jsonl/.parquet/.arrow files; or a token directory with a manifest.json "
                                      "(python -m GPT_Trainer.docs_corpus build DIR: its own tokenizer and test split)")
    dataset_config: str | None = _flag(None, "hub dataset config name (unset: CC-MAIN-2024-51 for HuggingFaceFW/fineweb, "
                                             "none otherwise)")
    text_column: str = _flag("text", "the dataset column holding the documents")
    tokenizer: str | None = _flag(None, f"'{BUILTIN}', a hub name or a local directory (unset: {BUILTIN} for the built-in "
                                        "corpus and local data, meta-llama/Llama-2-7b-hf for hub datasets; on resume, the "
                                        "checkpoint's own)")
    mlp_type: str = _flag("normal", "normal = SwiGLU", choices=("normal", "gelu"))
    clipping_value: float | None = _flag(None, "gradient-norm clipping (unset: none)")
    weight_decay: float = _flag(0.01, "AdamW weight decay")
    model_save_path: str | None = _flag(None, "run directory (unset: models/RUN_NAME/)")
    overwrite: bool = _flag(False, "replace an existing run directory instead of refusing to start")
    num_save_steps: int = _flag(1_000, "checkpoint every N steps (and at the end)")
    keep_dataset_in_mem: bool = _flag(False, "load datasets into memory instead of memory-mapping them")
    num_workers: int = _flag(0, "DataLoader worker processes reading and tokenising batches ahead of the GPU")
    prefetch_factor: int = _flag(4, "batches each DataLoader worker prepares ahead (with --num_workers > 0)")
    model_max_length: int | None = _flag(None, "max_position_embeddings (unset: SEQ_LEN)")
    test_per: float = _flag(0.001, "held-out fraction: datasets' train_test_split(test_size, seed=123) "
                                    "(token directories bring their own test split)")
    num_steps_test: int = _flag(10_000, "evaluate on the test split every N steps")
    model_size: str = _flag("small", f"one of {', '.join(MODEL_SIZES)}")
    test_loss: bool = _flag(True, "evaluate on the test split")
    load_checkpoint: bool = _flag(False, "resume from --checkpoint_path (settings not given on the command line "
                                         "come from the checkpoint)")
    checkpoint_path: str | None = _flag(None, "checkpoint directory to resume from (unset: models/RUN_NAME/)")
    activation_checkpointing: bool = _flag(True, "recompute attention cores and MLPs in the backward pass "
                                                 "(less memory, about 30%% more compute)")
    seed: int = _flag(0, "seeds model initialisation and data sampling")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings a resume takes from the checkpoint unless given on the command line. The authors' config.pt
# holds the first group; our run_config.json holds them all.
AUTHORS_CONFIG_KEYS = ("dataset", "model_size", "learning_rate", "warmup_steps", "num_steps", "wandb_name", "log_steps",
                       "use_amp", "mlp_type", "clipping_value", "weight_decay", "model_max_length")
RESTORED_KEYS = AUTHORS_CONFIG_KEYS + ("dataset_config", "text_column", "tokenizer", "wandb_project", "batch_size",
                                       "test_per", "num_steps_test", "num_save_steps", "test_loss", "seed")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line of RunConfig. With suppress_defaults, only flags given explicitly are parsed."""
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for f in dataclasses.fields(RunConfig):
        meta = dict(f.metadata)
        kwargs = {"help": meta["help"]}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            p.add_argument(f.name, type=int if f.type in (int, "int") else str, **kwargs)
            continue
        kind = str(f.type)
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
        if f.default is not None and "(default: " not in kwargs["help"]:
            kwargs["help"] += f" (default: {f.default})".replace("%", "%%")
        if not suppress_defaults:
            kwargs["default"] = f.default
        p.add_argument(f"--{f.name}", **kwargs)
    return p


def explicit_flags(argv) -> set[str]:
    """Names of the settings given on the command line."""
    return set(vars(build_parser(suppress_defaults=True).parse_known_args(argv)[0]))


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def parse_args(argv=None, world_size: int = 1) -> RunConfig:
    """Parse and check every argument; usage errors exit with status 2 before anything heavy is built."""
    parser = build_parser()
    cfg = RunConfig(**vars(parser.parse_args(argv)))
    try:
        attention_config(cfg.attention_type)
        check_dataset_arg(cfg.dataset)
    except ValueError as err:
        parser.error(str(err))
    if cfg.seq_len < 1:
        parser.error(f"seq_len must be >= 1, got {cfg.seq_len}")
    if cfg.model_size not in MODEL_SIZES:
        parser.error(f"unknown --model_size {cfg.model_size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    if cfg.batch_size < 1 or cfg.batch_size % world_size:
        parser.error(f"--batch_size {cfg.batch_size} must be a positive multiple of the number of processes ({world_size})")
    for name in ("num_steps", "num_steps_early_stop", "log_steps", "num_save_steps", "num_steps_test", "prefetch_factor"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_workers < 0 or (cfg.num_threads is not None and cfg.num_threads < 1):
        parser.error("--num_workers must be >= 0 and --num_threads >= 1")
    if cfg.warmup_steps < 0 or cfg.learning_rate <= 0 or cfg.weight_decay < 0:
        parser.error("--warmup_steps and --weight_decay must be >= 0 and --learning_rate > 0")
    if not 0 < cfg.test_per < 1:
        parser.error(f"--test_per must be in (0, 1), got {cfg.test_per}")
    if cfg.clipping_value is not None and cfg.clipping_value <= 0:
        parser.error(f"--clipping_value must be > 0 (omit it for no clipping), got {cfg.clipping_value}")
    cfg.wandb_name = cfg.wandb_name or cfg.run_name
    cfg.model_save_path = cfg.model_save_path or os.path.join("models", cfg.run_name)
    cfg.checkpoint_path = cfg.checkpoint_path or cfg.model_save_path
    cfg.model_max_length = cfg.model_max_length or cfg.seq_len
    if cfg.model_max_length < 1:
        parser.error(f"--model_max_length must be >= 1, got {cfg.model_max_length}")
    if cfg.load_checkpoint and not os.path.isdir(cfg.checkpoint_path):
        checkpoint.recover_run_dir(cfg.checkpoint_path)
        if not os.path.isdir(cfg.checkpoint_path):
            parser.error(f"--load_checkpoint: checkpoint directory {cfg.checkpoint_path} does not exist")
    if cfg.wandb_mode is None:
        env_mode = os.environ.get("WANDB_MODE")
        cfg.wandb_mode = env_mode if env_mode in WANDB_MODES else ("online" if _wandb_key_configured() else "offline")
    if cfg.dev == "gpu" and not torch.cuda.is_available():
        warnings.warn("--dev gpu but CUDA is not available: training on the CPU")
        cfg.dev = "cpu"
    return cfg


def read_run_config(path: str) -> dict | None:
    """RUN_DIR/run_config.json as written by write_run_config; None when absent."""
    file = os.path.join(path, RUN_CONFIG_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err}); fix or remove it to resume from config.pt") from err


def restore_settings(cfg: RunConfig, explicit: set[str]) -> dict:
    """Take the checkpoint's settings for every restorable flag not given on the command line (as the
    authors' load_checkpoint restores config.pt); returns {name: value} of what changed."""
    saved = read_run_config(cfg.checkpoint_path)
    keys = RESTORED_KEYS
    if saved is None:
        try:
            saved = load_training_config(cfg.checkpoint_path) or {}
        except ValueError as err:
            raise UserError(str(err)) from err
        keys = AUTHORS_CONFIG_KEYS
    changed = {}
    for key in keys:
        if key in explicit or key not in saved:
            continue
        value = saved[key]
        if value != getattr(cfg, key):
            changed[key] = value
            setattr(cfg, key, value)
    return changed


def setup_distributed(cfg: RunConfig) -> Distributed:
    """One process per device under torchrun (NCCL on GPUs, gloo on CPU); plain `python` = one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.dev == "gpu":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Distributed(rank=rank, world_size=world_size, device=device)


def set_threads(cfg: RunConfig) -> int:
    """--num_threads; else $OMP_NUM_THREADS; else on the CPU the cores shared among this machine's processes
    (at least 1)."""
    if cfg.num_threads is not None:
        threads = cfg.num_threads
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
    elif cfg.dev == "cpu":
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // local_procs)
    else:
        return torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def open_wandb(cfg: RunConfig, wandb_id: str | None, dist_info: Distributed):
    """A wandb run on rank 0 (None elsewhere or when disabled); resumes `wandb_id` when given."""
    if cfg.wandb_mode == "disabled" or not dist_info.is_main:
        return None
    import wandb

    return wandb.init(
        project=cfg.wandb_project, name=cfg.wandb_name, id=wandb_id, resume="allow" if wandb_id else None,
        mode=cfg.wandb_mode, config=cfg.to_dict(),
    )


def write_run_config(cfg: RunConfig, meta: dict) -> None:
    """RUN_DIR/run_config.json: the settings and what this launch found (written once per launch)."""
    path = os.path.join(cfg.model_save_path, RUN_CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({**cfg.to_dict(), **meta}, f, indent=2)
    os.replace(path + ".tmp", path)


def resolve_tokenizer(cfg: RunConfig):
    """--tokenizer; else on resume the checkpoint's own files (the Llama-2 hub tokenizer for the authors'
    checkpoints that hold none); else the default for --dataset."""
    if cfg.tokenizer is None and cfg.load_checkpoint:
        if has_tokenizer_files(cfg.checkpoint_path):
            return load_tokenizer(cfg.checkpoint_path)
        if default_tokenizer_name(cfg.dataset) == BUILTIN:
            return load_tokenizer(BUILTIN)
        return load_tokenizer(cfg.checkpoint_path)  # falls back to meta-llama/Llama-2-7b-hf
    return load_tokenizer(cfg.tokenizer or default_tokenizer_name(cfg.dataset))


def check_token_tokenizer(tokenizer, manifest: dict, dataset: str) -> None:
    """Token files only mean something with the tokenizer that wrote them."""
    wrote = (manifest["vocab_size"], manifest.get("bos_token_id"), manifest.get("eos_token_id"))
    if (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id) != wrote:
        raise UserError(f"the tokens in {dataset} were written by {os.path.join(dataset, manifest['tokenizer'])} "
                        f"({wrote[0]} tokens, BOS {wrote[1]}, EOS {wrote[2]}); this run's tokenizer has {len(tokenizer)} "
                        f"tokens, BOS {tokenizer.bos_token_id}, EOS {tokenizer.eos_token_id}: drop --tokenizer")


def build_model(cfg: RunConfig, vocab_size: int, device: torch.device):
    if not cfg.load_checkpoint:
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        return get_model(cfg.model_size, cfg.model_max_length, vocab_size, cfg.attention_type, cfg.mlp_type).to(device)
    saved = read_config(cfg.checkpoint_path, vocab_size)
    if saved.attention_type != cfg.attention_type:
        raise UserError(f"{cfg.checkpoint_path} holds a {saved.attention_type!r} model, not {cfg.attention_type!r}")
    if saved.vocab_size != vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the checkpoint's embedding {saved.vocab_size}: "
                        "pass the tokenizer the checkpoint was trained with (--tokenizer)")
    model = load_model(cfg.checkpoint_path, device).train()
    # Record what the checkpoint holds, not the flags (e.g. resuming the authors' medium models).
    held = {"model_max_length": model.config.max_position_embeddings}
    trained = load_training_config(cfg.checkpoint_path) or {}
    if "model_size" in trained:
        held["model_size"] = trained["model_size"]
    changed = {k: v for k, v in held.items() if v != getattr(cfg, k)}
    if changed:
        warnings.warn(f"{cfg.checkpoint_path} holds a model with {changed}; using that instead of the flags")
        for key, value in changed.items():
            setattr(cfg, key, value)
    return model


def _resumes_in_place(cfg: RunConfig) -> bool:
    return cfg.load_checkpoint and os.path.abspath(cfg.model_save_path) == os.path.abspath(cfg.checkpoint_path)


def check_run_dir(cfg: RunConfig) -> None:
    """Never replace an existing run directory unless asked to (--overwrite); resuming in place is fine."""
    checkpoint.recover_run_dir(cfg.model_save_path)
    path = cfg.model_save_path
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if _resumes_in_place(cfg):
        return
    if not cfg.overwrite:
        raise UserError(f"{path} already holds a run; resume it with --load_checkpoint, choose another RUN_NAME or "
                        "--model_save_path, or pass --overwrite to replace it")


def main(argv=None) -> str:
    """Train; returns the run directory."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    restored = {}
    if cfg.load_checkpoint:
        restored = restore_settings(cfg, explicit_flags(argv))
        try:
            read_config(cfg.checkpoint_path, None)  # a broken config.json is reported as such, before anything else
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"cannot resume from {cfg.checkpoint_path}: {err}") from err
    check_run_dir(cfg)
    threads = set_threads(cfg)
    dist_info = setup_distributed(cfg)
    if dist_info.is_main and restored:
        print(f"resuming with the checkpoint's settings {restored} (give a flag to override one)", flush=True)
    try:
        tokenizer = resolve_tokenizer(cfg)
        token_counts = {}
        if is_token_dataset(cfg.dataset):
            train_data, test_data, manifest = load_token_dataset(cfg.dataset, cfg.seq_len)
            check_token_tokenizer(tokenizer, manifest, cfg.dataset)
            train, test = manifest["splits"]["train"], manifest["splits"]["test"]
            token_counts = {"train_tokens": train["tokens"], "test_tokens": test["tokens"],
                            "num_train_documents": train["documents"], "num_test_documents": test["documents"],
                            "num_train_windows": len(train_data), "num_test_windows": len(test_data)}
        else:
            train_data, test_data = load_text_dataset(cfg.dataset, cfg.test_per, cfg.keep_dataset_in_mem,
                                                      cfg.dataset_config, cfg.text_column)
        model = build_model(cfg, len(tokenizer), dist_info.device)
    except ValueError as err:
        raise UserError(str(err)) from err
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    ddp_model = model
    if dist_info.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-7,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(cfg.warmup_steps, cfg.num_steps))

    start_step, nonfinite_steps, wandb_id = 0, 0, None
    if cfg.load_checkpoint:
        resumed = checkpoint.restore_training_state(cfg.checkpoint_path, optimizer, scheduler, model)
        start_step, nonfinite_steps, wandb_id = resumed.step, resumed.nonfinite_steps, resumed.wandb_id
        if resumed.sampler is not None and "batches_drawn" in resumed.sampler:
            RandomBatchSampler(len(train_data), cfg.batch_size, cfg.seed).check_state(resumed.sampler)
        if resumed.rng is not None:
            checkpoint.set_rng_state(resumed.rng, dist_info.device)

    logger = None
    if dist_info.is_main:
        if cfg.overwrite and os.path.isdir(cfg.model_save_path) and not _resumes_in_place(cfg):
            shutil.rmtree(cfg.model_save_path)
        appending = cfg.load_checkpoint and os.path.isfile(os.path.join(cfg.model_save_path, METRICS_FILE))
        wandb_run = open_wandb(cfg, wandb_id, dist_info)
        wandb_id = wandb_run.id if wandb_run is not None else wandb_id
        logger = MetricsLogger(cfg.model_save_path, wandb_run, append=appending)
        write_run_config(cfg, {
            "wandb_id": wandb_id, "world_size": dist_info.world_size, "vocab_size": len(tokenizer),
            "num_train_documents": len(train_data), "num_test_documents": len(test_data), "num_threads": threads,
            "resumed_from_step": start_step if cfg.load_checkpoint else None,
            "restored_from_checkpoint": sorted(restored), **token_counts,
        })
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.attention_type} {cfg.model_size} ({n_params / 1e6:.1f}M parameters), seq_len {cfg.seq_len}, "
              f"global batch {cfg.batch_size} on {dist_info.world_size} x {dist_info.device.type}, "
              f"{len(train_data)} train / {len(test_data)} test {'windows' if token_counts else 'documents'}, "
              f"starting at step {start_step}", flush=True)

    trainer = Trainer(cfg, model, ddp_model, tokenizer, train_data, test_data, optimizer, scheduler,
                      dist_info, logger, start_step, nonfinite_steps, wandb_id)
    saved = trainer.train()
    if dist_info.is_main:
        if logger.wandb_run is not None:
            logger.wandb_run.finish()
        if saved:
            print(f"saved the model at step {trainer.step} to {os.path.abspath(cfg.model_save_path)}", flush=True)
        else:
            print(f"nothing to train: the run is at step {trainer.step} and stops at step "
                  f"{min(cfg.num_steps, cfg.num_steps_early_stop)}; no model was saved to "
                  f"{os.path.abspath(cfg.model_save_path)}", flush=True)
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be saving
        del trainer, ddp_model  # DDP's reducer must go before its process group, or gloo teardown can hang
        dist.destroy_process_group()
    return cfg.model_save_path


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="train.py"))
