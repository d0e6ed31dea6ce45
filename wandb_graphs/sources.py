"""Where run histories come from: local run directories or the public wandb project. Both answer
history(group, run) -> {metric: (steps, values)}, or None when the run is not there."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from GPT_Trainer.cli import UserError
from niah_and_hs.plotting import output_name, type_name
from wandb_graphs.definitions import Group, Run, local_group
from wandb_graphs.local_runs import METRICS_FILE, History, find_runs, load_run_config, load_run_history, run_dirs


class SourceError(UserError):
    """The source as a whole is unusable (no wandb, no network, no runs directory)."""


# run_config.json keys whose values must agree for runs to share a plot (attention types are what differ)
SETTING_KEYS = ("model_size", "seq_len", "dataset")


class LocalSource:
    def __init__(self, runs_dir: Path | str, map_file: Path | str | None = None):
        self.runs_dir = Path(runs_dir)
        if not self.runs_dir.is_dir():
            raise SourceError(f"runs directory {self.runs_dir} does not exist (set --runs_dir)")
        self.configs = {run_dir: load_run_config(run_dir) for run_dir in run_dirs(self.runs_dir)}
        self.index = find_runs(self.runs_dir, self.configs)
        # A mapped path is relative to the runs directory (an absolute one stays as it is).
        self.index.update({run_id: self.runs_dir / run_dir for run_id, run_dir in read_map(map_file).items()})
        self._cache: dict[Path, History] = {}

    def __str__(self) -> str:
        return f"local runs in {self.runs_dir}"

    def history(self, group: Group, run: Run) -> History | None:
        run_dir = self.index.get(run.run_id)
        if run_dir is None or not (run_dir / METRICS_FILE).is_file():
            return None
        if run_dir not in self._cache:
            self._cache[run_dir] = load_run_history(run_dir)
        return self._cache[run_dir]

    def own_groups(self, definitions: Path | str) -> list[Group]:
        """Every run under the runs directory, one group per setting (model size, sequence length, dataset
        of run_config.json), one line per run labelled by its attention type: no map needed."""
        by_setting: dict[tuple, list[tuple[Path, dict]]] = {}
        for run_dir, config in sorted(self.configs.items(), key=lambda item: natural_key(item[0])):
            setting = tuple("unknown" if config.get(key) is None else str(config[key]) for key in SETTING_KEYS)
            by_setting.setdefault(setting, []).append((run_dir, config))
        groups = []
        for (size, seq_len, dataset), members in sorted(by_setting.items()):
            labels = [type_name(str(config["attention_type"])) if config.get("attention_type") else run_dir.name
                      for run_dir, config in members]
            runs = []
            for label, (run_dir, _) in zip(labels, members):
                # Runs are keyed by path: a folder name may also be another run's run name.
                self.index[str(run_dir)] = run_dir
                shown = f"{label} ({run_dir.name})" if labels.count(label) > 1 and label != run_dir.name else label
                runs.append(Run(str(run_dir), shown, None))
            dataset_name = Path(dataset).name or dataset
            name = output_name(["local", size, seq_len, dataset_name], sep="_")
            groups.append(local_group(name, tuple(runs), f"{size}, {seq_len} tokens, {dataset_name}", definitions))
        return groups


def natural_key(path: Path) -> list:
    """run_2 before run_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def read_map(map_file: Path | str | None) -> dict[str, str]:
    if map_file is None:
        return {}
    try:
        mapping = json.loads(Path(map_file).read_text())
    except OSError as e:
        raise UserError(f"cannot read --map {map_file}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"--map {map_file}:{e.lineno}: not JSON ({e.msg})") from e
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UserError(f"--map {map_file}: must be a JSON object {{paper run id: run directory}}")
    return mapping


class WandbSource:
    def __init__(self):
        try:
            import wandb  # optional: only this source needs it
        except ImportError as e:
            raise SourceError("--source wandb needs the wandb package (pip install wandb); "
                              "or use --source local") from e
        # Api() fails without an API key; requests' connection errors are OSErrors.
        self._errors = (wandb.errors.Error, OSError)
        try:
            self.api = wandb.Api()
        except self._errors as e:
            raise SourceError(f"cannot use the wandb API ({e}); it needs network access and an API key "
                              "(wandb login, or WANDB_API_KEY)") from e
        self._cache: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}

    def __str__(self) -> str:
        return "wandb"

    def history(self, group: Group, run: Run) -> History | None:
        if group.project_entity is None or group.project_name is None or group.last_step_num is None:
            raise SourceError(f"group {group.name!r} names no wandb project (project_entity, project_name, "
                              "last_step_num); render it with --source local")
        project = f"{group.project_entity}/{group.project_name}"
        try:
            api_run = self._find_run(project, run.run_id)
            if api_run is None:
                return None
            series = {metric: self._series(project, api_run, metric, group.last_step_num)
                      for metric in (group.train_metric, group.test_metric)}
            # Like a local log, a history holds only the metrics that were logged.
            return {metric: points for metric, points in series.items() if len(points[0])}
        except self._errors as e:
            raise SourceError(f"wandb request for {project}/{run.run_id} failed: {e}") from e

    def _find_run(self, project: str, run_id: str):
        """By wandb id first, then by display name (the seed matched either)."""
        try:
            return self.api.run(f"{project}/{run_id}")
        except ValueError:  # wandb's RunNotFoundError is a ValueError
            pass
        matches = list(self.api.runs(project, filters={"displayName": run_id}))
        if len(matches) > 1:
            print(f"warning: {len(matches)} wandb runs in {project} are named {run_id!r}; none used",
                  file=sys.stderr)
        return matches[0] if len(matches) == 1 else None

    def _series(self, project: str, api_run, metric: str, last_step_num: int) -> tuple[np.ndarray, np.ndarray]:
        key = (project, api_run.id, metric)
        if key not in self._cache:
            # One metric per scan: a scan returns only rows holding every requested key, and train and test
            # values are logged at different steps. A page as large as the run avoids partial histories.
            rows = api_run.scan_history(keys=["_step", metric], page_size=last_step_num)
            points = sorted((int(row["_step"]), float(row[metric])) for row in rows
                            if isinstance(row.get(metric), (int, float)))
            steps, values = zip(*points) if points else ((), ())
            self._cache[key] = (np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64))
        return self._cache[key]


Source = LocalSource | WandbSource
