"""Reading the run directories our trainer writes: metrics.jsonl (one JSON object per log line) and
run_config.json. A history maps each metric to (steps, values), sorted by step."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from GPT_Trainer.cli import UserError

History = dict[str, tuple[np.ndarray, np.ndarray]]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "run_config.json"


def load_run_history(run_dir: Path | str) -> History:
    """Every numeric key of metrics.jsonl as a series over "step". A resumed run appends lines, so a step
    may repeat: the later line wins, per metric (an eval line never hides the train loss of its step)."""
    path = Path(run_dir) / METRICS_FILE
    by_metric: dict[str, dict[int, float]] = {}
    try:
        # stray bytes fail as a non-JSON line, not as a decode crash
        lines = path.read_text(errors="replace").split("\n")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a truncated last line; the rest of the log is still good.
            print(f"warning: {path}:{line_no}: not JSON, skipped", file=sys.stderr)
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if not isinstance(step, int) or isinstance(step, bool):
            # Not written by our trainer (hand-edited or another tool's): one bad line must not cost the run.
            print(f"warning: {path}:{line_no}: not a JSON object with an integer \"step\", skipped",
                  file=sys.stderr)
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_metric.setdefault(key, {})[step] = float(value)
    history = {}
    for key, values in by_metric.items():
        steps = np.array(sorted(values), dtype=np.int64)
        history[key] = (steps, np.array([values[s] for s in steps], dtype=np.float64))
    return history


def load_run_config(run_dir: Path | str) -> dict:
    """run_config.json as a dict; {} when absent or unreadable (reported): the run's log is still usable."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as e:
        print(f"warning: {path}:{e.lineno}: not JSON ({e.msg}), ignored", file=sys.stderr)
        return {}
    if not isinstance(config, dict):
        print(f"warning: {path}: not a JSON object, ignored", file=sys.stderr)
        return {}
    return config


def run_display_name(run_dir: Path | str) -> str:
    return load_run_config(run_dir).get("run_name") or Path(run_dir).resolve().name


def run_dirs(runs_dir: Path | str) -> list[Path]:
    """The run directories (those holding a metrics.jsonl) directly under runs_dir."""
    return sorted(p for p in Path(runs_dir).iterdir() if (p / METRICS_FILE).is_file())


def find_runs(runs_dir: Path | str, configs: dict[Path, dict] | None = None) -> dict[str, Path]:
    """{key: run dir} for every run directory directly under runs_dir. Each run is reachable by its wandb
    id, run name, wandb name and folder name; a key two runs share is dropped (reported) rather than
    silently picking one. configs: the runs' run_config.json contents when already read."""
    if configs is None:
        configs = {run_dir: load_run_config(run_dir) for run_dir in run_dirs(runs_dir)}
    runs: dict[str, Path] = {}
    ambiguous: set[str] = set()
    for run_dir, config in configs.items():
        keys = {config.get("wandb_id"), config.get("run_name"), config.get("wandb_name"), run_dir.name}
        for key in keys - {None, ""}:
            if key in runs and runs[key] != run_dir:
                ambiguous.add(key)
            runs[key] = run_dir
    for key in sorted(ambiguous, key=str):
        print(f"warning: {key!r} names several runs under {runs_dir}; use --map to choose one", file=sys.stderr)
        del runs[key]
    return runs
