"""The training loop: step, evaluate, log, save (train.py builds everything and resumes, then calls `Trainer.train`).

Every rank runs the same loop on its slice of each global batch; only rank 0 writes logs and checkpoints.
Decisions that must agree across ranks (skipping a non-finite step, stopping) are all-reduced first.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from GPT_Trainer import checkpoint
from GPT_Trainer.data import collate

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"
MAX_CONSECUTIVE_NONFINITE = 5


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks (identity on one process)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def linear_warmup_decay(warmup_steps: int, num_steps: int):
    """The seed's schedule as a LambdaLR factor: 0 -> 1 over warmup_steps, then linearly to 0 at num_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (num_steps - step) / max(1, num_steps - warmup_steps))

    return factor


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the non-ignored labels (0 for a batch of padding only) and their count."""
    count = int((labels != -100).sum())
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total / max(count, 1), count


class MetricsLogger:
    """metrics.jsonl in the run directory (always, rank 0) and wandb when a run is open."""

    def __init__(self, run_dir: str, wandb_run=None, append: bool = False):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.wandb_run = wandb_run
        os.makedirs(run_dir, exist_ok=True)
        if not append:
            open(self.path, "w").close()

    def log(self, step: int, values: dict) -> None:
        # Opened per line so that a checkpoint swap of the run directory never leaves a stale handle.
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in values.items() if k != "time"}, step=step)


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, args, model, ddp_model, tokenizer, train_data, test_data, optimizer, scheduler, sampler,
                 dist_info: Distributed, logger: MetricsLogger | None, start_step: int = 0, nonfinite_steps: int = 0,
                 wandb_id: str | None = None):
        self.args, self.model, self.ddp_model, self.tokenizer = args, model, ddp_model, tokenizer
        self.train_data, self.test_data = train_data, test_data
        self.optimizer, self.scheduler, self.sampler = optimizer, scheduler, sampler
        self.dist, self.logger = dist_info, logger
        self.step, self.nonfinite_steps, self.wandb_id = start_step, nonfinite_steps, wandb_id
        self.per_rank_batch = args.batch_size // dist_info.world_size
        self.amp = args.use_amp and dist_info.device.type == "cuda"
        self._last_bad_batch = None

    def _forward_loss(self, model, inputs, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            logits = model(inputs.to(self.dist.device)).logits
        return token_loss(logits, labels.to(self.dist.device))

    def train_step(self) -> tuple[float, int, bool]:
        """One update on the next global batch: (loss on this rank, its token count, finite on every rank)."""
        indices = self.sampler.next_batch(self.args.batch_size, self.dist.rank, self.dist.world_size)
        inputs, labels = collate([self.train_data[i] for i in indices], self.tokenizer, self.args.seq_len)
        loss, count = self._forward_loss(self.ddp_model, inputs, labels)
        loss.backward()
        loss_value = loss.item()
        finite = self.dist.sum([float(not math.isfinite(loss_value))])[0] == 0
        if finite:
            if self.args.clipping_value is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clipping_value)
            self.optimizer.step()
        else:
            self._last_bad_batch = (inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, count, finite

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted mean loss over the whole test split, shared out across ranks."""
        self.model.eval()
        total, count = 0.0, 0
        mine = list(range(self.dist.rank, len(self.test_data), self.dist.world_size))
        for start in range(0, len(mine), self.per_rank_batch):
            texts = [self.test_data[i] for i in mine[start : start + self.per_rank_batch]]
            inputs, labels = collate(texts, self.tokenizer, self.args.seq_len)
            loss, n = self._forward_loss(self.model, inputs, labels)
            total, count = total + loss.item() * n, count + n
        self.model.train()
        total, count = self.dist.sum([total, float(count)])
        test_loss = total / max(count, 1.0)
        return {"test_loss": test_loss, "test_perplexity": math.exp(min(test_loss, 700.0))}

    def training_config(self) -> dict:
        """The seed's config.pt dict (plain values only)."""
        a = self.args
        return {
            "dataset": a.dataset, "model_size": a.model_size, "learning_rate": a.learning_rate,
            "warmup_steps": a.warmup_steps, "num_steps": a.num_steps, "wandb_name": a.wandb_name,
            "log_steps": a.log_steps, "use_amp": a.use_amp, "dev": a.dev, "attention_type": a.attention_type,
            "mlp_type": a.mlp_type, "clipping_value": a.clipping_value, "weight_decay": a.weight_decay,
            "step_ckpt": self.step, "wandb_id": self.wandb_id, "model_max_length": a.model_max_length,
        }

    def save(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "step": self.step, "sampler": self.sampler.state_dict(), "rng": checkpoint.rng_state(self.dist.device),
            "nonfinite_steps": self.nonfinite_steps, "wandb_id": self.wandb_id,
            "batch_size": self.args.batch_size, "seq_len": self.args.seq_len,
        }
        checkpoint.save_checkpoint(self.args.model_save_path, self.model, self.tokenizer, self.optimizer,
                                   self.scheduler, self.training_config(), state)

    def _stop_on_nonfinite(self, consecutive: int) -> None:
        inputs, labels = self._last_bad_batch
        run_dir = self.args.model_save_path
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, f"nonfinite_batch_step{self.step}_rank{self.dist.rank}.pt")
        torch.save({"input_ids": inputs, "labels": labels, "step": self.step, "rank": self.dist.rank}, path)
        raise NonFiniteLossError(
            f"{consecutive} non-finite losses in a row (step {self.step}); stopping every rank. "
            f"The last batch of each rank is saved as {os.path.join(run_dir, 'nonfinite_batch_step*_rank*.pt')}"
        )

    def train(self) -> None:
        args = self.args
        stop = min(args.num_steps, args.num_steps_early_stop)
        bar = tqdm(total=stop, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True)
        window_loss, window_steps, window_tokens, consecutive = 0.0, 0, 0, 0
        window_start = time.time()
        saved_step = self.step
        while self.step < stop:
            lr = self.scheduler.get_last_lr()[0]
            loss, tokens, finite = self.train_step()
            self.step += 1
            bar.update(1)
            window_tokens += tokens
            if finite:
                consecutive = 0
                window_loss, window_steps = window_loss + loss, window_steps + 1
            else:
                self.nonfinite_steps, consecutive = self.nonfinite_steps + 1, consecutive + 1
                if consecutive >= MAX_CONSECUTIVE_NONFINITE:
                    self._stop_on_nonfinite(consecutive)
            if self.step % args.log_steps == 0:
                loss_sum, steps, tokens_sum = self.dist.sum([window_loss, float(window_steps), float(window_tokens)])
                elapsed = max(time.time() - window_start, 1e-9)
                mean_loss = loss_sum / steps if steps else None  # None (JSON null): every step was non-finite
                record = {
                    "loss": mean_loss, "perplexity": math.exp(min(mean_loss, 700.0)) if steps else None,
                    "lr": lr, "tokens_per_s": tokens_sum / elapsed, "time": time.time(),
                    "nonfinite_steps": self.nonfinite_steps,
                }
                if self.logger:
                    self.logger.log(self.step, record)
                bar.set_postfix(loss=f"{mean_loss:.4f}" if steps else "nan", tok_s=f"{tokens_sum / elapsed:,.0f}")
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.time()
            if args.test_loss and self.step % args.num_steps_test == 0:
                metrics = self.evaluate()
                if self.logger:
                    self.logger.log(self.step, metrics)
                if self.dist.is_main:
                    bar.write(f"step {self.step}: test_loss {metrics['test_loss']:.4f}, "
                              f"test_perplexity {metrics['test_perplexity']:.2f}")
            if self.step % args.num_save_steps == 0:
                self.save()
                saved_step = self.step
        if saved_step != self.step:
            self.save()
        bar.close()
