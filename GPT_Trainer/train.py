"""Train a Llama-2 model whose attention is ATTENTION_TYPE (SPEC section 6).

    torchrun --nproc_per_node=G --master-port P GPT_Trainer/train.py SEQ_LEN RUN_NAME ATTENTION_TYPE [flags]
    python GPT_Trainer/train.py SEQ_LEN RUN_NAME ATTENTION_TYPE [flags]      (one process)

Every setting of the seed's script is a flag with the seed's default; `--help` lists them. This file checks
the arguments, sets up the processes, data, model and optimizer (or resumes them), then runs trainer.Trainer.
"""
from __future__ import annotations

import argparse
import json
import netrc
import os
import warnings

import torch
import torch.distributed as dist

from GPT_Trainer import checkpoint
from GPT_Trainer.data import (
    BUILTIN, HUB_DATASETS, RandomSampler, check_dataset_arg, default_tokenizer_name, load_text_dataset, load_tokenizer,
)
from GPT_Trainer.LlamaDecoderLayerClean import attention_config
from GPT_Trainer.modeling import MODEL_SIZES, get_model, load_model, load_training_config, read_config
from GPT_Trainer.trainer import METRICS_FILE, RUN_CONFIG_FILE, Distributed, MetricsLogger, Trainer, linear_warmup_decay

WANDB_MODES = ("online", "offline", "disabled")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flag = argparse.BooleanOptionalAction
    p.add_argument("seq_len", type=int, help="training sequence length in tokens (the paper: 2048, 4096, 8192)")
    p.add_argument("run_name", help="name of the run; checkpoints and logs go to models/RUN_NAME/")
    p.add_argument("attention_type", help="a key of `configs` in GPT_Trainer/LlamaDecoderLayerClean.py")
    p.add_argument("--batch_size", type=int, default=32, help="GLOBAL batch size, split evenly across processes")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup_steps", type=int, default=10_000, help="linear warmup from 0, then linear decay")
    p.add_argument("--num_steps", type=int, default=1_000_000, help="schedule length: lr reaches 0 here")
    p.add_argument("--num_steps_early_stop", type=int, default=100_000, help="stop here; the schedule is unchanged")
    p.add_argument("--dev", choices=("gpu", "cpu"), default="gpu",
                   help="gpu falls back to cpu (with a warning) when CUDA is unavailable")
    p.add_argument("--wandb_name", default=None, help="wandb run name (default: RUN_NAME)")
    p.add_argument("--wandb_project", default="Mamba_Squared_Experiemnts", help="wandb project")
    p.add_argument("--wandb_mode", choices=WANDB_MODES, default=None,
                   help="default: online when a wandb key is configured, else offline; disabled if wandb is not installed")
    p.add_argument("--log_steps", type=int, default=10, help="log mean loss, perplexity, lr, tokens/s every N steps")
    p.add_argument("--use_amp", action=flag, default=True, help="bf16 autocast (CUDA only; CPU runs stay in fp32)")
    p.add_argument("--dataset", default=None,
                   help=f"None/'{BUILTIN}': the built-in offline corpus (the seed used HuggingFaceFW/fineweb, config "
                        f"CC-MAIN-2024-51); a hub dataset ({', '.join(HUB_DATASETS)}; needs `datasets` and network); "
                        "or a local file/directory of .txt/.jsonl/.parquet/.arrow with a `text` column")
    p.add_argument("--tokenizer", default=None,
                   help=f"'{BUILTIN}', a hub name or a local directory (default: {default_tokenizer_name(None)} for "
                        f"local and built-in data, {default_tokenizer_name('HuggingFaceFW/fineweb')} for hub "
                        "datasets; on resume, the checkpoint's own tokenizer)")
    p.add_argument("--mlp_type", choices=("normal", "gelu"), default="normal", help="normal = SwiGLU")
    p.add_argument("--clipping_value", type=float, default=None, help="gradient-norm clipping (default: none)")
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--model_save_path", default=None, help="run directory (default: models/RUN_NAME/)")
    p.add_argument("--num_save_steps", type=int, default=1_000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep_dataset_in_mem", action=flag, default=False,
                   help="load datasets into memory instead of memory-mapping them")
    p.add_argument("--model_max_length", type=int, default=None, help="max_position_embeddings (default: seq_len)")
    p.add_argument("--test_per", type=float, default=0.001, help="held-out fraction (split seed 123)")
    p.add_argument("--num_steps_test", type=int, default=10_000, help="evaluate on the whole test split every N steps")
    p.add_argument("--model_size", default="small", help=f"one of {', '.join(MODEL_SIZES)}")
    p.add_argument("--test_loss", action=flag, default=True, help="evaluate on the test split")
    p.add_argument("--load_checkpoint", action=flag, default=False, help="resume from --checkpoint_path")
    p.add_argument("--checkpoint_path", default=None, help="checkpoint directory to resume from (default: models/RUN_NAME/)")
    p.add_argument("--activation_checkpointing", action=flag, default=True,
                   help="recompute attention cores and MLPs in the backward pass (less memory, ~30%% more compute)")
    p.add_argument("--seed", type=int, default=0, help="seeds model initialisation and data sampling")
    return p


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def parse_args(argv=None, world_size: int = 1) -> argparse.Namespace:
    """Parse and check every argument; exits with a clear message before anything heavy is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        attention_config(args.attention_type)
        check_dataset_arg(args.dataset)
    except ValueError as err:
        parser.error(str(err))
    if args.seq_len < 1:
        parser.error(f"seq_len must be >= 1, got {args.seq_len}")
    if args.model_size not in MODEL_SIZES:
        parser.error(f"unknown --model_size {args.model_size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    if args.batch_size < 1 or args.batch_size % world_size:
        parser.error(f"--batch_size {args.batch_size} must be a positive multiple of the number of processes ({world_size})")
    for name in ("num_steps", "num_steps_early_stop", "log_steps", "num_save_steps", "num_steps_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0 or args.learning_rate <= 0 or args.weight_decay < 0:
        parser.error("--warmup_steps and --weight_decay must be >= 0 and --learning_rate > 0")
    if not 0 < args.test_per < 1:
        parser.error(f"--test_per must be in (0, 1), got {args.test_per}")
    if args.clipping_value is not None and args.clipping_value <= 0:
        parser.error(f"--clipping_value must be > 0 (omit it for no clipping), got {args.clipping_value}")
    args.wandb_name = args.wandb_name or args.run_name
    args.model_save_path = args.model_save_path or os.path.join("models", args.run_name)
    args.checkpoint_path = args.checkpoint_path or args.model_save_path
    args.model_max_length = args.model_max_length or args.seq_len
    if args.model_max_length < 1:
        parser.error(f"--model_max_length must be >= 1, got {args.model_max_length}")
    if args.load_checkpoint and not os.path.isdir(args.checkpoint_path):
        checkpoint.recover_run_dir(args.checkpoint_path)
        if not os.path.isdir(args.checkpoint_path):
            parser.error(f"--load_checkpoint: checkpoint directory {args.checkpoint_path} does not exist")
    if args.wandb_mode in ("online", "offline") and not _wandb_installed():
        parser.error(f"--wandb_mode {args.wandb_mode} needs the wandb package (pip install wandb); "
                     "use --wandb_mode disabled to log to metrics.jsonl only")
    if args.wandb_mode is None:
        args.wandb_mode = ("online" if _wandb_key_configured() else "offline") if _wandb_installed() else "disabled"
    if args.dev == "gpu" and not torch.cuda.is_available():
        warnings.warn("--dev gpu but CUDA is not available: training on the CPU")
        args.dev = "cpu"
    return args


def setup_distributed(args) -> Distributed:
    """One process per device under torchrun (NCCL on GPUs, gloo on CPU); plain `python` = one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.dev == "gpu":
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


def open_wandb(args, wandb_id: str | None, dist_info: Distributed):
    """A wandb run on rank 0 (None elsewhere or when disabled); resumes `wandb_id` when given."""
    if args.wandb_mode == "disabled" or not dist_info.is_main:
        return None
    import wandb

    return wandb.init(
        project=args.wandb_project, name=args.wandb_name, id=wandb_id, resume="allow" if wandb_id else None,
        mode=args.wandb_mode, config=vars(args),
    )


def write_run_config(args, wandb_id, dist_info: Distributed, vocab_size: int, start_step: int) -> None:
    config = {**vars(args), "wandb_id": wandb_id, "world_size": dist_info.world_size, "vocab_size": vocab_size,
              "resumed_from_step": start_step if args.load_checkpoint else None}
    path = os.path.join(args.model_save_path, RUN_CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(path + ".tmp", path)


def resolve_tokenizer(args):
    """--tokenizer; else on resume the checkpoint's own (or, for the authors' checkpoints that only pickled
    theirs, the default for the dataset they trained on); else the default for --dataset."""
    if args.tokenizer is None and args.load_checkpoint:
        if os.path.isfile(os.path.join(args.checkpoint_path, "tokenizer_config.json")):
            return load_tokenizer(args.checkpoint_path)
        trained_on = (load_training_config(args.checkpoint_path) or {}).get("dataset", args.dataset)
        return load_tokenizer(default_tokenizer_name(trained_on))
    return load_tokenizer(args.tokenizer or default_tokenizer_name(args.dataset))


def build_model(args, vocab_size: int, device: torch.device):
    if not args.load_checkpoint:
        torch.manual_seed(args.seed)  # every rank builds the same initial weights
        return get_model(args.model_size, args.model_max_length, vocab_size, args.attention_type, args.mlp_type).to(device)
    saved = read_config(args.checkpoint_path, vocab_size)
    if saved.attention_type != args.attention_type:
        raise ValueError(f"{args.checkpoint_path} holds a {saved.attention_type!r} model, not {args.attention_type!r}")
    if saved.vocab_size != vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the checkpoint's embedding {saved.vocab_size}: "
                         "pass the tokenizer the checkpoint was trained with (--tokenizer)")
    model = load_model(args.checkpoint_path, device).train()
    # Record what the checkpoint holds, not the flags' defaults (e.g. resuming the authors' medium models).
    held = {"model_size": (load_training_config(args.checkpoint_path) or {}).get("model_size", args.model_size),
            "model_max_length": model.config.max_position_embeddings}
    changed = {k: v for k, v in held.items() if v != getattr(args, k)}
    if changed:
        warnings.warn(f"{args.checkpoint_path} holds a model with {changed}; using that instead of the flags")
        vars(args).update(changed)
    return model


def main(argv=None) -> str:
    """Train; returns the run directory."""
    args = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    dist_info = setup_distributed(args)
    tokenizer = resolve_tokenizer(args)
    train_data, test_data = load_text_dataset(args.dataset, args.test_per, args.keep_dataset_in_mem)

    model = build_model(args, len(tokenizer), dist_info.device)
    model.set_activation_checkpointing(args.activation_checkpointing)
    ddp_model = model
    if dist_info.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-7,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(args.warmup_steps, args.num_steps))
    sampler = RandomSampler(len(train_data), args.seed)

    start_step, nonfinite_steps, wandb_id = 0, 0, None
    if args.load_checkpoint:
        resumed = checkpoint.restore_training_state(args.checkpoint_path, optimizer, scheduler)
        start_step, nonfinite_steps, wandb_id = resumed.step, resumed.nonfinite_steps, resumed.wandb_id
        if resumed.sampler is not None:
            sampler.load_state_dict(resumed.sampler)
        else:
            sampler = RandomSampler(len(train_data), args.seed + start_step)  # not a replay of the first batches
        if resumed.rng is not None:
            checkpoint.set_rng_state(resumed.rng, dist_info.device)

    logger = None
    if dist_info.is_main:
        checkpoint.recover_run_dir(args.model_save_path)
        has_log = os.path.isfile(os.path.join(args.model_save_path, METRICS_FILE))
        appending = args.load_checkpoint and has_log
        if has_log and not args.load_checkpoint:
            warnings.warn(f"{args.model_save_path} holds an earlier run; its log and checkpoint will be replaced")
        wandb_run = open_wandb(args, wandb_id, dist_info)
        wandb_id = wandb_run.id if wandb_run is not None else wandb_id
        logger = MetricsLogger(args.model_save_path, wandb_run, append=appending)
        write_run_config(args, wandb_id, dist_info, len(tokenizer), start_step)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.attention_type} {args.model_size} ({n_params / 1e6:.1f}M parameters), seq_len {args.seq_len}, "
              f"global batch {args.batch_size} on {dist_info.world_size} x {dist_info.device.type}, "
              f"{len(train_data)} train / {len(test_data)} test documents, starting at step {start_step}", flush=True)

    trainer = Trainer(args, model, ddp_model, tokenizer, train_data, test_data, optimizer, scheduler, sampler,
                      dist_info, logger, start_step, nonfinite_steps, wandb_id)
    trainer.train()
    if dist_info.is_main:
        if logger.wandb_run is not None:
            logger.wandb_run.finish()
        print(f"saved the model at step {trainer.step} to {os.path.abspath(args.model_save_path)}", flush=True)
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be saving
        del trainer, ddp_model  # DDP's reducer must go before its process group, or gloo teardown can hang
        dist.destroy_process_group()
    return args.model_save_path


if __name__ == "__main__":
    main()
