"""The paper's figure/table groups, read from paper_figures.json (data, not code)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.colors import is_color_like

from GPT_Trainer.cli import UserError

DEFINITIONS_PATH = Path(__file__).with_name("paper_figures.json")


@dataclass(frozen=True)
class Run:
    run_id: str  # wandb run id (or run name) as the paper's definitions give it
    label: str  # legend label and table row name
    color: str | None  # a matplotlib colour; None: the colour cycle


@dataclass(frozen=True)
class Panel:
    """One plot of a group: which metric, its axis label, title and output file name."""

    metric: str
    label: str
    title: str
    filename: str


@dataclass(frozen=True)
class Group:
    name: str  # output folder, e.g. "1_base_models"
    runs: tuple[Run, ...]
    train_title: str
    train_file: str
    test_title: str
    test_file: str
    x_axis_rename: str
    plot_axis_names: bool
    train_metric: str
    train_label: str
    test_metric: str
    test_label: str
    metric_n_step_avg: int
    table_filename: str
    bold_best: bool
    num_decimals: int
    # where the runs live on wandb; a group of local runs only (docs/results/groups.json) has none
    project_entity: str | None = None
    project_name: str | None = None
    last_step_num: int | None = None

    @property
    def train(self) -> Panel:
        return Panel(self.train_metric, self.train_label, self.train_title, self.train_file)

    @property
    def test(self) -> Panel:
        return Panel(self.test_metric, self.test_label, self.test_title, self.test_file)


def matplotlib_color(name: str) -> str:
    """The seed's colours are CSS names for plotly; some are spelt with a space ("light blue")."""
    for candidate in (name, name.replace(" ", "")):
        if is_color_like(candidate):
            return candidate
    raise ValueError(f"unknown colour {name!r}")


def _read(path: Path | str) -> dict:
    """The definitions file; a bad one is the user's input, reported in one line."""
    try:
        data = json.loads(Path(path).read_text())
        return {"defaults": dict(data["defaults"]), "groups": list(data["groups"])}
    except OSError as e:
        raise UserError(f"cannot read definitions {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not JSON ({e.msg})") from e
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: needs \"defaults\" (an object) and \"groups\" (a list): {e}") from e


def load_groups(path: Path | str = DEFINITIONS_PATH) -> list[Group]:
    data = _read(path)
    groups = []
    for entry in data["groups"]:
        try:
            fields = {**data["defaults"], **entry}
            fields["runs"] = tuple(Run(run_id, label, matplotlib_color(color))
                                   for run_id, label, color in fields["runs"])
            groups.append(Group(**fields))
        except (KeyError, TypeError, ValueError) as e:  # a misspelt or missing key, a bad run entry or colour
            name = entry.get("name") if isinstance(entry, dict) else entry
            raise UserError(f"{path}: group {name!r}: {e}") from e
    return groups


def local_group(name: str, runs: tuple[Run, ...], title: str, path: Path | str = DEFINITIONS_PATH) -> Group:
    """A group of local runs with the definitions' defaults (table window, decimals, metrics)."""
    fields = {**_read(path)["defaults"], "name": name, "runs": runs, "bold_best": True,
              "train_title": f"{title} (Train)", "train_file": "train_loss.svg",
              "test_title": f"{title} (Test)", "test_file": "test_loss.svg"}
    try:
        return Group(**fields)
    except TypeError as e:
        raise UserError(f"{path}: defaults: {e}") from e
