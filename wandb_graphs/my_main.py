"""Paper figures and tables from logged runs, and quick comparison plots of local runs.

Each group of wandb_graphs/paper_figures.json gives <out>/<group>/: a train-loss and a test-loss plot
(SVG, PNG beside it) and a booktabs LaTeX table (Model | Train loss | Test loss). With --source local, each
setting (model size, seq_len, dataset) of one's own runs is a group too: one line per attention type.

  python wandb_graphs/my_main.py                                  # all groups, from the public wandb project
  python wandb_graphs/my_main.py --only 1_base_models 8.1_full_comp
  python wandb_graphs/my_main.py --source local --runs_dir models # your runs (+ paper groups found there)
  python wandb_graphs/my_main.py --source local --runs_dir models --map paper_to_local.json
  python wandb_graphs/my_main.py --compare models/run_a models/run_b
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from GPT_Trainer.cli import UserError, run
from niah_and_hs.plotting import output_name
from wandb_graphs.definitions import DEFINITIONS_PATH, Group, Run, load_groups
from wandb_graphs.local_runs import METRICS_FILE, History, load_run_history, run_display_name
from wandb_graphs.render import Line, latex_table, plot_lines, train_table_value
from wandb_graphs.sources import LocalSource, Source, WandbSource

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PACKAGE_DIR / "figures"
DEFAULT_RUNS_DIR = PACKAGE_DIR.parent / "models"

# --compare: (metric key in metrics.jsonl, axis label, file stem, --smooth applies); the test loss has
# few points, each already a mean over the whole test split
COMPARE_PANELS = (("loss", "Train loss", "train_loss", True), ("test_loss", "Test loss", "test_loss", False),
                  ("tokens_per_s", "Tokens/s", "tokens_per_s", True))


def render_group(group: Group, source: Source, out_dir: Path, smooth: int, seed_indexing: bool) -> list[Path]:
    """Plots and table of one group from the runs the source has; reports the runs it lacks when it has
    some. Returns the files written (none when no run of the group is found)."""
    found: list[tuple[Run, History]] = []
    missing: list[Run] = []
    for run in group.runs:
        history = source.history(group, run)
        if history is None:
            missing.append(run)
        else:
            found.append((run, history))
    if not found:
        return []
    for run in missing:
        print(f"[{group.name}] missing run {run.run_id} ({run.label!r}) in {source}: left out", file=sys.stderr)

    group_dir = out_dir / group.name
    xlabel = group.x_axis_rename if group.plot_axis_names else None
    written = []
    for panel, window in ((group.train, smooth), (group.test, 1)):
        lines = []
        for run, history in found:
            if panel.metric in history:
                lines.append(Line(run.label, run.color, *history[panel.metric]))
            else:
                print(f"[{group.name}] run {run.run_id} ({run.label!r}) has no {panel.metric!r} values",
                      file=sys.stderr)
        if lines:
            written += plot_lines(lines, group_dir / panel.filename, panel.title, xlabel,
                                  panel.label if group.plot_axis_names else None, smooth=window)

    rows = []
    for run, history in found:
        train = history.get(group.train_metric)
        test = history.get(group.test_metric)
        rows.append((run.label,
                     None if train is None else train_table_value(train[1], group.metric_n_step_avg, seed_indexing),
                     None if test is None else float(test[1][-1])))
    train_rule = (f"the logged value {group.metric_n_step_avg} entries from the end" if seed_indexing
                  else f"mean of the last {group.metric_n_step_avg} logged values")
    caption = f"{group.train_label}: {train_rule}; {group.test_label}: last logged value."
    table = latex_table(rows, ("Model", group.train_label, group.test_label), caption, f"tab:{group.name}",
                        group.num_decimals, group.bold_best)
    table_path = group_dir / group.table_filename
    table_path.parent.mkdir(parents=True, exist_ok=True)  # no plot made it when no run logged a loss
    table_path.write_text(table)
    return written + [table_path]


def render_groups(groups: list[Group], source: Source, out_dir: Path, smooth: int, seed_indexing: bool) -> int:
    """Render every group that has a run in the source. Groups with none (most paper groups, for local
    runs) are counted in one line rather than listed run by run."""
    rendered, empty = 0, []
    for group in groups:
        files = render_group(group, source, out_dir, smooth, seed_indexing)
        if files:
            rendered += 1
            print(f"[{group.name}] wrote {len(files)} files in {out_dir / group.name}")
        else:
            empty.append(group.name)
    if empty:
        hint = "; --map assigns paper run ids to local run directories" if isinstance(source, LocalSource) else ""
        print(f"{len(empty)} of {len(groups)} groups have no run in {source}: skipped ({', '.join(empty[:3])}"
              f"{', ...' if len(empty) > 3 else ''}; --list shows each group's runs{hint})", file=sys.stderr)
    print(f"{rendered}/{len(groups)} groups rendered into {out_dir}")
    return rendered


def compare(run_dirs: list[Path], out_dir: Path | None, smooth: int) -> list[Path]:
    """Train loss, test loss and tokens/s against step for any local runs, one line per run. Without
    out_dir the folder is named after the runs, so comparing other runs never overwrites these plots."""
    usable = [run_dir for run_dir in run_dirs if (run_dir / METRICS_FILE).is_file()]
    if not usable:
        raise UserError(f"no {METRICS_FILE} in any --compare directory ({', '.join(map(str, run_dirs))})")
    for run_dir in run_dirs:
        if run_dir not in usable:
            print(f"no {METRICS_FILE} in {run_dir}: skipped", file=sys.stderr)
    runs = [(run_display_name(run_dir), load_run_history(run_dir)) for run_dir in usable]
    out_dir = out_dir or DEFAULT_OUT / "compare" / output_name([name for name, _ in runs])
    written = []
    for metric, label, stem, smoothable in COMPARE_PANELS:
        lines = [Line(name, None, *history[metric]) for name, history in runs if metric in history]
        if not lines:
            print(f"no run logged {metric!r}: no {stem} plot", file=sys.stderr)
            continue
        written += plot_lines(lines, out_dir / f"{stem}.svg", f"{label} vs step", "step", label,
                              smooth=smooth if smoothable else 1)
    if not written:
        raise UserError("none of the --compare runs logged " + ", ".join(m for m, *_ in COMPARE_PANELS))
    for path in written:
        print(f"wrote {path}")
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("wandb", "local"), default="wandb",
                        help="wandb: the paper's public project through the wandb API (needs `pip install "
                             "wandb`, network and an API key); local: run directories written by our trainer "
                             "(metrics.jsonl, run_config.json): the paper groups whose runs are there, plus "
                             "one group of all runs per setting (model size, seq_len, dataset) named "
                             "local_<size>_<seq_len>_<dataset>. Default: wandb")
    parser.add_argument("--runs_dir", type=Path, default=DEFAULT_RUNS_DIR,
                        help="--source local: folder holding one directory per run; a paper run is found by "
                             f"its wandb id, run name, wandb name or folder name. Default: {DEFAULT_RUNS_DIR}")
    parser.add_argument("--map", type=Path, dest="map_file", metavar="FILE",
                        help="--source local: JSON {paper run id: run directory} (relative to --runs_dir) "
                             "for runs whose ids differ from the paper's")
    parser.add_argument("--only", nargs="+", metavar="GROUP",
                        help="render only these groups, named by output folder (e.g. 1_base_models); "
                             "--list shows them")
    parser.add_argument("--list", action="store_true",
                        help="list the groups and their runs (with --source local, also the local groups), "
                             "then exit")
    parser.add_argument("--out", type=Path,
                        help=f"output folder. Default: {DEFAULT_OUT} (with --compare: "
                             f"{DEFAULT_OUT / 'compare'}/<run names>)")
    parser.add_argument("--definitions", type=Path, default=DEFINITIONS_PATH,
                        help="figure definitions (JSON). Default: the paper's, wandb_graphs/paper_figures.json")
    parser.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="plot the train loss (and tokens/s) as a trailing mean over N logged values; the "
                             "table is unaffected. Default: 1 (raw values)")
    parser.add_argument("--seed_table_values", action="store_true",
                        help="train-loss table value = the single value metric_n_step_avg entries from the end, "
                             "as the seed computed it (the paper's printed train losses); default: the mean of "
                             "the last metric_n_step_avg logged values")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="RUN_DIR",
                        help="instead of the groups: plot train loss, test loss and tokens/s against "
                             "step for these local run directories")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        compare(args.compare, args.out, args.smooth)
        return 0

    groups = load_groups(args.definitions)
    source = None
    if args.source == "local":
        source = LocalSource(args.runs_dir, args.map_file)
        if not source.configs and not args.list:
            raise UserError(f"no run under {args.runs_dir} (a run is a folder holding a {METRICS_FILE}, as "
                            "GPT_Trainer/train.py writes it); set --runs_dir")
        groups += source.own_groups(args.definitions)
    if args.list:
        for group in groups:
            print(f"{group.name}: " + ", ".join(f"{run.run_id} ({run.label})" for run in group.runs))
        return 0
    if args.only:
        names = {group.name for group in groups}
        unknown = [name for name in args.only if name not in names]
        if unknown:
            raise UserError(f"unknown group(s) {', '.join(unknown)}; groups: {', '.join(sorted(names))}")
        groups = [group for group in groups if group.name in args.only]
    rendered = render_groups(groups, source or WandbSource(), args.out or DEFAULT_OUT, args.smooth,
                             args.seed_table_values)
    if not rendered:
        raise UserError(f"no run of these groups found in {source or 'wandb'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
