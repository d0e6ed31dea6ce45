"""The paper's figure/table groups, read from paper_figures.json (data, not code)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.colors import is_color_like

DEFINITIONS_PATH = Path(__file__).with_name("paper_figures.json")


@dataclass(frozen=True)
class Run:
    run_id: str  # wandb run id (or run name) as the paper's definitions give it
    label: str  # legend label and table row name
    color: str  # a matplotlib colour


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
    project_entity: str
    project_name: str
    last_step_num: int
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


def load_groups(path: Path | str = DEFINITIONS_PATH) -> list[Group]:
    data = json.loads(Path(path).read_text())
    groups = []
    for entry in data["groups"]:
        fields = {**data["defaults"], **entry}
        fields["runs"] = tuple(Run(run_id, label, matplotlib_color(color)) for run_id, label, color in fields["runs"])
        try:
            groups.append(Group(**fields))
        except TypeError as e:  # a misspelt or missing key
            raise ValueError(f"{path}: group {entry.get('name')!r}: {e}") from e
    return groups
