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
from GPT_Trainer.data import RandomBatchSampler, eval_batches, make_loader

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
    """The authors' schedule as a LambdaLR factor: 0 -> 1 over warmup_steps, then linearly to 0 at num_steps."""

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
    """Runs steps start_step, start_step + 1, ... (0-based, as the authors' loop) up to
    min(num_steps, num_steps_early_stop) - 1, logging under the authors' keys and definitions:

    - at every step s with s % log_steps == 0: `loss` = rank 0's summed loss since the last log divided by
      log_steps (so the step-0 value is that step's loss / log_steps, as theirs), `perplexity` = exp(loss),
      `lr` = the schedule's value at s; plus our additions `loss_all_ranks` (token-weighted mean over every
      rank's tokens since the last log), `tokens_per_s`, `data_wait_ms` (mean wait for the next batch),
      `nonfinite_steps`;
    - at every step s > 0 with s % num_steps_test == 0, and at the last step: `test_loss` = mean over test batches of each batch's
      mean token loss, averaged over ranks; `test_perplexity` = mean over batches of exp(batch loss); plus
      `test_loss_token_weighted`.
    """

    def __init__(self, args, model, ddp_model, tokenizer, train_data, test_data, optimizer, scheduler,
                 dist_info: Distributed, logger: MetricsLogger | None, start_step: int = 0, nonfinite_steps: int = 0,
                 wandb_id: str | None = None):
        self.args, self.model, self.ddp_model, self.tokenizer = args, model, ddp_model, tokenizer
        self.train_data, self.test_data = train_data, test_data
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dist, self.logger = dist_info, logger
        self.step, self.nonfinite_steps, self.wandb_id = start_step, nonfinite_steps, wandb_id
        self.per_rank_batch = args.batch_size // dist_info.world_size
        self.amp = args.use_amp and dist_info.device.type == "cuda"
        self.sampler = RandomBatchSampler(len(train_data), args.batch_size, args.seed, dist_info.rank,
                                          dist_info.world_size, start=self.step)  # one batch per step
        self._last_bad_batch = None

    def _loader(self, data, batch_sampler):
        return make_loader(data, batch_sampler, self.tokenizer, self.args.seq_len,
                           num_workers=self.args.num_workers,
                           pin_memory=self.dist.device.type == "cuda",
                           prefetch_factor=self.args.prefetch_factor)

    def _forward_loss(self, model, inputs, labels):
        device = self.dist.device
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            logits = model(inputs.to(device, non_blocking=True)).logits
        return token_loss(logits, labels.to(device, non_blocking=True))

    def train_step(self, inputs, labels) -> tuple[float, int, bool]:
        """One update on this rank's part of the global batch: (loss, its token count, finite on every rank)."""
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
    def evaluate(self, step: int) -> dict | None:
        """The authors' test metrics over this rank's DistributedSampler share of the test split."""
        batches = eval_batches(len(self.test_data), self.per_rank_batch, self.dist.rank, self.dist.world_size, step)
        self.model.eval()
        loss_sum, ppl_sum, tokens_loss, tokens = 0.0, 0.0, 0.0, 0
        for inputs, labels in self._loader(self.test_data, batches):
            loss, n = self._forward_loss(self.model, inputs, labels)
            value = loss.item()
            loss_sum, ppl_sum = loss_sum + value, ppl_sum + math.exp(min(value, 700.0))
            tokens_loss, tokens = tokens_loss + value * n, tokens + n
        self.model.train()
        mean_loss = loss_sum / len(batches) if batches else 0.0
        mean_ppl = ppl_sum / len(batches) if batches else 0.0
        loss_total, ppl_total, ranks_with_batches, tl, tn = self.dist.sum(
            [mean_loss, mean_ppl, float(bool(batches)), tokens_loss, float(tokens)])
        if ranks_with_batches < self.dist.world_size:
            return None  # fewer test documents than ranks: nothing to average
        return {"test_loss": loss_total / self.dist.world_size, "test_perplexity": ppl_total / self.dist.world_size,
                "test_loss_token_weighted": tl / max(tn, 1.0)}

    def training_config(self) -> dict:
        """The authors' config.pt dict (plain values only)."""
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
            "step": self.step, "sampler": self.sampler.state_dict(self.step),
            "rng": checkpoint.rng_state(self.dist.device), "nonfinite_steps": self.nonfinite_steps,
            "wandb_id": self.wandb_id, "batch_size": self.args.batch_size, "seq_len": self.args.seq_len,
            "param_names": [name for name, _ in self.model.named_parameters()],
        }
        checkpoint.save_checkpoint(self.args.model_save_path, self.model, self.tokenizer, self.optimizer,
                                   self.scheduler, self.training_config(), state)

    def _stop_on_nonfinite(self, consecutive: int, step: int) -> None:
        inputs, labels = self._last_bad_batch
        run_dir = self.args.model_save_path
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, f"nonfinite_batch_step{step}_rank{self.dist.rank}.pt")
        torch.save({"input_ids": inputs, "labels": labels, "step": step, "rank": self.dist.rank}, path)
        raise NonFiniteLossError(
            f"{consecutive} non-finite losses in a row (step {step}); stopping every rank. "
            f"The last batch of each rank is saved as {os.path.join(run_dir, 'nonfinite_batch_step*_rank*.pt')}"
        )

    def _log_test(self, step: int, bar) -> None:
        metrics = self.evaluate(step)
        if metrics is None:
            return
        if self.logger:
            self.logger.log(step, metrics)
        if self.dist.is_main:
            bar.write(f"step {step}: test_loss {metrics['test_loss']:.4f}, test_perplexity {metrics['test_perplexity']:.2f}")

    def train(self) -> bool:
        """Train to the stop step; True when a checkpoint was saved (False: nothing was left to train)."""
        args = self.args
        stop = min(args.num_steps, args.num_steps_early_stop)
        if self.step >= stop:
            return False
        bar = tqdm(total=stop, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True)
        window_loss, window_steps, window_tokens, window_token_loss, window_wait, consecutive = 0.0, 0, 0, 0.0, 0.0, 0
        window_finite_tokens, window_start = 0, time.time()
        saved_step = self.step
        batches = iter(self._loader(self.train_data, self.sampler))
        while self.step < stop:
            step = self.step
            lr = self.scheduler.get_last_lr()[0]
            wait_start = time.perf_counter()
            inputs, labels = next(batches)
            window_wait += time.perf_counter() - wait_start
            loss, tokens, finite = self.train_step(inputs, labels)
            self.step += 1
            bar.update(1)
            window_tokens += tokens
            window_steps += 1
            if finite:
                consecutive = 0
                window_loss, window_token_loss = window_loss + loss, window_token_loss + loss * tokens
                window_finite_tokens += tokens
            else:  # a non-finite step counts as 0 (as the authors zero it)
                self.nonfinite_steps, consecutive = self.nonfinite_steps + 1, consecutive + 1
                if consecutive >= MAX_CONSECUTIVE_NONFINITE:
                    self._stop_on_nonfinite(consecutive, step)
            if step % args.log_steps == 0:
                token_loss_sum, finite_tokens, tokens_sum = self.dist.sum(
                    [window_token_loss, float(window_finite_tokens), float(window_tokens)])
                elapsed = max(time.time() - window_start, 1e-9)
                any_finite = consecutive < window_steps  # at least one finite step since the last log
                mean_loss = window_loss / args.log_steps if any_finite else None
                record = {
                    "loss": mean_loss,
                    "perplexity": math.exp(min(mean_loss, 700.0)) if any_finite else None,
                    "lr": lr,
                    "loss_all_ranks": token_loss_sum / finite_tokens if any_finite and finite_tokens else None,
                    "tokens_per_s": tokens_sum / elapsed, "data_wait_ms": 1000.0 * window_wait / window_steps,
                    "time": time.time(), "nonfinite_steps": self.nonfinite_steps,
                }
                if self.logger:
                    self.logger.log(step, record)
                bar.set_postfix(loss=f"{mean_loss:.4f}" if any_finite else "nan", tok_s=f"{tokens_sum / elapsed:,.0f}")
                window_loss, window_steps, window_tokens, window_token_loss, window_wait = 0.0, 0, 0, 0.0, 0.0
                window_finite_tokens = 0
                window_start = time.time()
            # The final model is always evaluated, so a run's last test loss is that of the weights it saves.
            if args.test_loss and step > 0 and (step % args.num_steps_test == 0 or self.step == stop):
                self._log_test(step, bar)
            if self.step % args.num_save_steps == 0:
                self.save()
                saved_step = self.step
        del batches
        if saved_step != self.step:
            self.save()
        bar.close()
        return True
