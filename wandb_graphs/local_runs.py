"""Reading the run directories our trainer writes: metrics.jsonl (one JSON object per log line) and
run_config.json. A history maps each metric to (steps, values), sorted by step."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

History = dict[str, tuple[np.ndarray, np.ndarray]]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "run_config.json"


def load_run_history(run_dir: Path | str) -> History:
    """Every numeric key of metrics.jsonl as a series over "step". A resumed run appends lines, so a step
    may repeat: the later line wins, per metric (an eval line never hides the train loss of its step)."""
    path = Path(run_dir) / METRICS_FILE
    by_metric: dict[str, dict[int, float]] = {}
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a truncated last line; the rest of the log is still good.
                print(f"warning: {path}:{line_no}: not JSON, skipped", file=sys.stderr)
                continue
            if "step" not in record:
                continue
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    by_metric.setdefault(key, {})[step] = float(value)
    history = {}
    for key, values in by_metric.items():
        steps = np.array(sorted(values), dtype=np.int64)
        history[key] = (steps, np.array([values[s] for s in steps], dtype=np.float64))
    return history


def load_run_config(run_dir: Path | str) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_display_name(run_dir: Path | str) -> str:
    return load_run_config(run_dir).get("run_name") or Path(run_dir).resolve().name


def find_runs(runs_dir: Path | str) -> dict[str, Path]:
    """{key: run dir} for every run directory directly under runs_dir. Each run is reachable by its wandb
    id, run name, wandb name and folder name; a key two runs share is dropped (reported) rather than
    silently picking one."""
    runs: dict[str, Path] = {}
    ambiguous: set[str] = set()
    for run_dir in sorted(p for p in Path(runs_dir).iterdir() if (p / METRICS_FILE).is_file()):
        config = load_run_config(run_dir)
        keys = {config.get("wandb_id"), config.get("run_name"), config.get("wandb_name"), run_dir.name}
        for key in keys - {None, ""}:
            if key in runs and runs[key] != run_dir:
                ambiguous.add(key)
            runs[key] = run_dir
    for key in sorted(ambiguous):
        print(f"warning: {key!r} names several runs under {runs_dir}; use --map to choose one", file=sys.stderr)
        del runs[key]
    return runs
