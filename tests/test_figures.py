"""Figures: wandb_graphs (definitions, local log reader, tables, plots) and the NIAH heatmap, from synthetic
run logs and results (CPU, offline). Figures are checked through their matplotlib objects: what is drawn,
and that every label is on the canvas without overlapping its neighbours."""
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from GPT_Trainer import cli
from GPT_Trainer.LlamaDecoderLayerClean import TWO_MAMBA
from niah_and_hs import niah_heatmap
from niah_and_hs.plotting import wrap_label
from wandb_graphs import my_main, render
from wandb_graphs.definitions import load_groups, matplotlib_color
from wandb_graphs.local_runs import find_runs, load_run_history
from wandb_graphs.render import Line, latex_escape, line_figure, trailing_mean

# The seed's own definitions (its my_main.py's list of dicts), kept to check our compact JSON against.
SEED_DEFINITIONS = Path(__file__).resolve().parent / "data" / "seed_figure_definitions.json"
GROUPS = {group.name: group for group in load_groups()}
LONG_TYPE = "linear__output_norm__A_mask_type_neg_softplus__in_conv_k_2__dt_on_values__Z_out_gate"


def write_run(runs_dir, folder, train_losses, test_losses, wandb_id=None, log_every=10, test_every=None,
              tokens_per_s=True, **config_values):
    """A run directory as our trainer writes it: train lines every log_every steps, eval lines apart."""
    run_dir = Path(runs_dir) / folder
    run_dir.mkdir(parents=True)
    config = {"run_name": folder, "wandb_name": folder, "wandb_id": wandb_id, "attention_type": "softmax",
              "model_size": "small", "seq_len": 2048, **config_values}
    (run_dir / "run_config.json").write_text(json.dumps(config))
    test_every = test_every or log_every * max(1, len(train_losses) // max(1, len(test_losses)))
    lines = []
    for i, loss in enumerate(train_losses, 1):
        record = {"step": i * log_every, "loss": float(loss), "perplexity": float(np.exp(loss)), "lr": 1e-4}
        if tokens_per_s:
            record["tokens_per_s"] = 1000.0 + i
        lines.append(json.dumps(record))
    lines += [json.dumps({"step": (i + 1) * test_every, "test_loss": float(loss)})
              for i, loss in enumerate(test_losses)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def table_rows(table_text):
    """{model: [cells]} of a table.txt body."""
    body = table_text.split("\\midrule\n")[1].split("\\bottomrule")[0]
    rows = {}
    for line in body.strip().splitlines():
        model, *cells = [c.strip() for c in re.split(r"(?<!\\)&", line.removesuffix("\\\\"))]
        rows[model] = cells
    return rows


def cell_value(cell):
    return float(re.sub(r"\\textbf\{(.*)\}", r"\1", cell))


def run_main(*args):
    """my_main as the command line runs it: exit status, a UserError as one line on stderr."""
    return cli.run(my_main.main, [str(a) for a in args], prog="my_main.py")


def drawn(fig):
    """The renderer of fig after drawing it (the layout is final then)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def assert_on_canvas(fig, artists):
    renderer = drawn(fig)
    for artist in artists:
        box = artist.get_window_extent(renderer)
        assert (box.x0 >= -0.5 and box.y0 >= -0.5 and box.x1 <= fig.bbox.x1 + 0.5
                and box.y1 <= fig.bbox.y1 + 0.5), f"{artist} at {box} is outside the {fig.bbox} canvas"


def shown(axis):
    """The tick labels of an axis that are drawn (matplotlib also keeps some beyond the view limits)."""
    low, high = sorted(axis.get_view_interval())
    return [label for tick, label in zip(axis.get_ticklocs(), axis.get_ticklabels()) if low <= tick <= high]


def assert_no_overlap(fig, labels):
    renderer = drawn(fig)
    boxes = [label.get_window_extent(renderer) for label in labels if label.get_text()]
    for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b), f"tick labels overlap: {a} and {b}"


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---------------------------------------------------------------------------------------------- definitions

def test_definitions_are_the_22_paper_groups():
    assert len(GROUPS) == 22
    assert {"1_base_models", "T1_isolated_comp_table", "8.6_full_comp", "13_slimpj"} <= set(GROUPS)
    assert all(group.runs for group in GROUPS.values())


def test_definitions_expand_to_the_seed_definitions():
    seed = json.loads(SEED_DEFINITIONS.read_text())
    ours = []
    for group in load_groups():
        out_dir = f"figures/{group.name}"
        ours.append({
            "metrics": [
                {"metric_name": group.train_metric, "metric_name_plot": group.train_label,
                 "metric_graph_title": group.train_title, "metric_graph_out_dir": out_dir,
                 "metric_graph_filename": group.train_file, "metric_n_step_avg": group.metric_n_step_avg},
                {"metric_name": group.test_metric, "metric_name_plot": group.test_label,
                 "metric_graph_title": group.test_title, "metric_graph_out_dir": out_dir,
                 "metric_graph_filename": group.test_file}],
            "runs": [{"run_name": r.run_id, "run_name_plot": r.label, "run_color": r.color} for r in group.runs],
            "project_entity": group.project_entity, "project_name": group.project_name,
            "last_step_num": group.last_step_num, "x_axis_rename": group.x_axis_rename,
            "plot_axis_names": group.plot_axis_names,
            "table_info": {"table_filename": group.table_filename, "bold_best": group.bold_best,
                           "num_decimals": group.num_decimals}})
    for group in seed:  # colours are normalised for matplotlib ("light blue" -> "lightblue")
        for run in group["runs"]:
            run["run_color"] = matplotlib_color(run["run_color"])
    assert ours == seed


# ---------------------------------------------------------------------------------------------- local logs

def test_load_run_history_resume_repeats_and_partial_lines(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [
        {"step": 10, "loss": 5.0, "lr": 1e-5, "tokens_per_s": 100.0},
        {"step": 20, "loss": 4.0, "lr": 2e-5},
        {"step": 20, "test_loss": 4.5, "test_perplexity": 90.0},
        {"step": 30, "loss": 3.5, "test_loss": 3.9, "note": "text is not a metric", "nan_ok": None},
        # resumed from the step-20 checkpoint: steps 30.. are logged again and the later lines win
        {"step": 30, "loss": 3.0},
        {"step": 40, "loss": 2.5},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n" + '{"step": 50, "lo'  # killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    history = load_run_history(run_dir)
    np.testing.assert_array_equal(history["loss"][0], [10, 20, 30, 40])
    np.testing.assert_array_equal(history["loss"][1], [5.0, 4.0, 3.0, 2.5])
    np.testing.assert_array_equal(history["test_loss"][0], [20, 30])
    np.testing.assert_array_equal(history["test_loss"][1], [4.5, 3.9])
    np.testing.assert_array_equal(history["tokens_per_s"][0], [10])
    assert "note" not in history and "nan_ok" not in history


def test_find_runs_by_wandb_id_run_name_and_folder(tmp_path):
    a = write_run(tmp_path, "run_a", [3.0], [3.0], wandb_id="abc123")
    b = write_run(tmp_path, "run_b", [3.0], [3.0])
    (tmp_path / "not_a_run").mkdir()
    runs = find_runs(tmp_path)
    assert runs["abc123"] == a and runs["run_a"] == a and runs["run_b"] == b
    assert "not_a_run" not in runs


@pytest.mark.parametrize("bad", ['{"step": "abc", "loss": 1.0}', "5", "null", "[1, 2]", '{"loss": 1.0}',
                                 '{"step": true, "loss": 1.0}', '{"step": 1.5, "loss": 1.0}', "\udcff\x00"])
def test_a_line_without_an_integer_step_is_skipped_naming_file_and_line(tmp_path, capsys, bad):
    run_dir = write_run(tmp_path, "run", [3.0, 2.0], [2.5])  # lines 1-3
    with (run_dir / "metrics.jsonl").open("a", errors="surrogateescape") as f:
        f.write(bad + "\n" + json.dumps({"step": 100.0, "loss": 1.0}) + "\n")  # an integral float step is a step
    history = load_run_history(run_dir)
    np.testing.assert_array_equal(history["loss"][0], [10, 20, 100])
    np.testing.assert_array_equal(history["loss"][1], [3.0, 2.0, 1.0])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {run_dir / 'metrics.jsonl'}:4: ") and err.count("\n") == 1
    assert err.rstrip().endswith("skipped")


def test_bad_lines_and_a_broken_run_config_never_stop_the_cli(tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs", "run", [3.0, 2.0], [2.5])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": "abc"}\n5\nnull\n')
    (run_dir / "run_config.json").write_text('{"run_name": ')
    assert run_main("--source", "local", "--runs_dir", tmp_path / "runs", "--out", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for line_no in (4, 5, 6):
        assert f"{run_dir / 'metrics.jsonl'}:{line_no}: " in err
    assert f"{run_dir / 'run_config.json'}:1: not JSON" in err
    # without a readable config the run still counts, by folder name, in a group of unknown settings
    assert list(table_rows((tmp_path / "out" / "local_unknown_unknown_unknown" / "table.txt").read_text())) == ["run"]


def test_trailing_mean_window_and_non_finite_values():
    values = np.array([1.0, 3.0, 5.0, np.nan, 7.0, np.inf, np.nan, np.nan, 9.0])
    expected = [1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 7.0, np.nan, 9.0]  # window 3, non-finite values left out
    np.testing.assert_allclose(trailing_mean(values, 3), expected)
    np.testing.assert_array_equal(trailing_mean(values, 1), values)


# ---------------------------------------------------------------------------------------------- groups

@pytest.fixture
def two_groups(tmp_path):
    """Runs of 1_base_models (no bold) and 2_lin_attn_norm_type (bold best), longer than the 1000-value
    table window, with known train/test values."""
    rng = np.random.default_rng(0)
    runs_dir = tmp_path / "runs"
    losses = {}
    # a distinct best per column: run 34nsedgl best train, opgr66ja best test in group 2
    levels = {"zfdskd9t": (3.0, 3.03), "qbcs9fqx": (2.91, 2.88), "ea9ph22z": (2.75, 2.73),
              "34nsedgl": (2.60, 2.95), "opgr66ja": (2.80, 2.50)}
    for i, (run_id, (train_level, test_level)) in enumerate(levels.items()):
        train = train_level + 0.1 * rng.standard_normal(1500)
        test = np.array([test_level + 0.3, test_level + 0.1, test_level])
        losses[run_id] = (train, test)
        write_run(runs_dir, f"local_{i}", train, test, wandb_id=run_id)
    return runs_dir, losses


def test_groups_render_files_and_exact_table_values(two_groups, tmp_path):
    runs_dir, losses = two_groups
    out = tmp_path / "out"
    assert run_main("--source", "local", "--runs_dir", runs_dir, "--out", out,
                    "--only", "1_base_models", "2_lin_attn_norm_type") == 0
    for name, prefix in (("1_base_models", "1"), ("2_lin_attn_norm_type", "2")):
        for stem in (f"{prefix}_train_loss", f"{prefix}_test_loss"):
            assert (out / name / f"{stem}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
            assert (out / name / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        group = GROUPS[name]
        rows = table_rows((out / name / "table.txt").read_text())
        assert list(rows) == [run.label for run in group.runs]
        for run in group.runs:
            train, test = losses[run.run_id]
            expected_train = round(float(np.mean(train[-1000:])), 2)
            expected_test = round(float(test[-1]), 2)
            assert [cell_value(c) for c in rows[run.label]] == pytest.approx([expected_train, expected_test], abs=1e-9)
            assert all(re.fullmatch(r"(\\textbf\{)?\d+\.\d{2}\}?", c) for c in rows[run.label])

    no_bold = (out / "1_base_models" / "table.txt").read_text()
    assert "\\textbf" not in no_bold
    bold = table_rows((out / "2_lin_attn_norm_type" / "table.txt").read_text())
    bold_cells = {(model, column) for model, cells in bold.items() for column, c in enumerate(cells) if "textbf" in c}
    assert bold_cells == {("Out Norm", 0), ("Out Norm + ReLU", 1)}


def test_seed_table_values_option(two_groups, tmp_path):
    runs_dir, losses = two_groups
    out = tmp_path / "out"
    assert run_main("--source", "local", "--runs_dir", runs_dir, "--out", out, "--only", "1_base_models",
                    "--seed_table_values") == 0
    rows = table_rows((out / "1_base_models" / "table.txt").read_text())
    for run in GROUPS["1_base_models"].runs:
        assert cell_value(rows[run.label][0]) == pytest.approx(round(float(losses[run.run_id][0][-1000]), 2))


def test_missing_run_is_reported_and_others_render(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "lin", [3.1, 3.0], [3.05], wandb_id="zfdskd9t")
    write_run(runs_dir, "sm", [2.8, 2.7], [2.75], wandb_id="ea9ph22z")
    out = tmp_path / "out"
    assert run_main("--source", "local", "--runs_dir", runs_dir, "--out", out,
                    "--only", "1_base_models", "12_pile") == 0
    err = capsys.readouterr().err
    assert "qbcs9fqx" in err and "Mamba-2" in err  # the missing run of a rendered group, by id and label
    assert "1 of 2 groups have no run" in err and "12_pile" in err  # an absent group: no line per run
    assert not (out / "12_pile").exists()
    rows = table_rows((out / "1_base_models" / "table.txt").read_text())
    assert list(rows) == ["Linear", "Softmax"]
    assert (out / "1_base_models" / "1_train_loss.svg").is_file()


def test_no_run_at_all_fails_and_unknown_group_lists_names(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_main("--source", "local", "--runs_dir", tmp_path / "empty", "--out", tmp_path / "out") == 1
    one_line_error(capsys, f"no run under {tmp_path / 'empty'} (a run is a folder holding a metrics.jsonl")
    write_run(tmp_path / "runs", "r", [3.0], [3.0])
    assert run_main("--source", "local", "--runs_dir", tmp_path / "runs", "--only", "nope") == 1
    one_line_error(capsys, "unknown group(s) nope", "1_base_models", "local_small_2048_unknown")
    assert run_main("--list") == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 22
    assert listing[0] == "1_base_models: zfdskd9t (Linear), qbcs9fqx (Mamba-2), ea9ph22z (Softmax)"


def test_map_file_and_run_without_test_loss(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "my_linear", [3.2, 3.1], [3.0])
    write_run(runs_dir, "my_softmax", [2.9, 2.8], [])
    write_run(runs_dir, "my_mamba", [3.0, 2.9], [2.95])
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps({"zfdskd9t": "my_linear", "ea9ph22z": "my_softmax",
                                    "qbcs9fqx": str(runs_dir / "my_mamba")}))
    out = tmp_path / "out"
    assert run_main("--source", "local", "--runs_dir", runs_dir, "--map", map_file, "--out", out,
                    "--only", "1_base_models") == 0
    assert "has no 'test_loss' values" in capsys.readouterr().err
    rows = table_rows((out / "1_base_models" / "table.txt").read_text())
    assert rows == {"Linear": ["3.15", "3.00"], "Mamba-2": ["2.95", "2.95"], "Softmax": ["2.85", "--"]}


def test_local_source_plots_ones_own_runs_without_a_map(tmp_path, capsys):
    """A newcomer's runs directory: no paper run, several attention types and two settings."""
    runs_dir = tmp_path / "models"
    setting = {"model_size": "small", "seq_len": 2048, "dataset": "HuggingFaceFW/fineweb"}
    write_run(runs_dir, "my_2mamba", [3.0, 2.8], [2.9], attention_type=TWO_MAMBA, **setting)
    write_run(runs_dir, "smA", [3.1, 2.7], [2.8], **setting)
    write_run(runs_dir, "smB", [3.2, 2.6], [2.7], **setting)
    write_run(runs_dir, "ablation", [3.3, 3.2], [3.1], attention_type=LONG_TYPE, **setting)
    write_run(runs_dir, "long_ctx", [3.0, 2.9], [2.95], attention_type=TWO_MAMBA, **{**setting, "seq_len": 8192})
    out = tmp_path / "out"
    assert run_main("--source", "local", "--runs_dir", runs_dir, "--out", out) == 0
    captured = capsys.readouterr()
    # one line about the 22 paper groups, none per missing paper run
    assert captured.err.splitlines() == [line for line in captured.err.splitlines() if "22 of 24 groups" in line]
    assert len(captured.err.splitlines()) == 1 and "--map" in captured.err
    assert "2/24 groups rendered" in captured.out
    rows = table_rows((out / "local_small_2048_fineweb" / "table.txt").read_text())
    assert list(rows) == [latex_escape(LONG_TYPE), "2Mamba", "Softmax (smA)", "Softmax (smB)"]
    assert rows["Softmax (smB)"] == ["\\textbf{2.90}", "\\textbf{2.70}"]
    assert list(table_rows((out / "local_small_8192_fineweb" / "table.txt").read_text())) == ["2Mamba"]
    for stem in ("train_loss", "test_loss"):
        assert (out / "local_small_2048_fineweb" / f"{stem}.png").is_file()
    assert run_main("--source", "local", "--runs_dir", runs_dir, "--list") == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 24 and listing[-1] == f"local_small_8192_fineweb: {runs_dir / 'long_ctx'} (2Mamba)"


def test_latex_escaping_and_ties(tmp_path):
    definitions = json.loads((Path(__file__).resolve().parents[1] / "wandb_graphs" / "paper_figures.json").read_text())
    definitions["groups"] = [{**definitions["groups"][1], "name": "special",
                              "runs": [["r1", "a_b 50% & #1 {x} $y$ ~^\\", "red"], ["r2", "plain", "blue"]]}]
    path = tmp_path / "defs.json"
    path.write_text(json.dumps(definitions))
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "r1", [2.004, 2.0], [2.0], wandb_id="r1")
    write_run(runs_dir, "r2", [2.0, 2.001], [2.1], wandb_id="r2")
    assert run_main("--definitions", path, "--source", "local", "--runs_dir", runs_dir, "--out", tmp_path / "out") == 0
    table = (tmp_path / "out" / "special" / "table.txt").read_text()
    label = r"a\_b 50\% \& \#1 \{x\} \$y\$ \textasciitilde{}\textasciicircum{}\textbackslash{}"
    assert label == latex_escape("a_b 50% & #1 {x} $y$ ~^\\")
    rows = table_rows(table)
    assert rows[label] == [r"\textbf{2.00}", r"\textbf{2.00}"] and rows["plain"] == [r"\textbf{2.00}", "2.10"]
    assert_compile_ready(table)


def assert_compile_ready(table):
    """Structure a LaTeX compiler needs: booktabs rules in order, balanced braces and environments, a row
    per line with as many cells as the header, and no unescaped special character in the rows."""
    lines = table.splitlines()
    assert lines[0] == r"\begin{table}[htbp]" and lines[-1] == r"\end{table}"
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    assert table.count(r"\begin{tabular}") == table.count(r"\end{tabular}") == 1
    unescaped = re.sub(r"\\[{}]", "", table)
    depth = 0
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    columns = re.search(r"\\begin\{tabular\}\{(\w+)\}", table).group(1)
    body = lines[lines.index(r"\toprule") + 1:lines.index(r"\bottomrule")]
    for line in (line for line in body if line != r"\midrule"):
        assert line.endswith(r" \\")
        cells = re.split(r"(?<!\\)&", line[:-3])
        assert len(cells) == len(columns)
        assert not re.search(r"(?<!\\)[_%#$]", line)
    label = re.search(r"\\label\{([^}]*)\}", table).group(1)
    assert label.startswith("tab:")


# ---------------------------------------------------------------------------------------------- all groups

@pytest.fixture(scope="module")
def all_groups_rendered(tmp_path_factory):
    """Short logs for every run id of the definitions; all groups rendered once. The plots are kept as
    figures, not saved (saving is tested above and takes most of the time): {svg path: figure}."""
    root = tmp_path_factory.mktemp("all_groups")
    rng = np.random.default_rng(1)
    run_ids = sorted({run.run_id for group in GROUPS.values() for run in group.runs})
    for i, run_id in enumerate(run_ids):
        # short logs keep the test fast; folder names differ from the ids so matching goes through run_config
        write_run(root / "runs", f"local_run_{i}", 3 + rng.random(20), 3 + rng.random(2), wandb_id=run_id)
    out = root / "out"
    figures = {}

    def keep_figure(lines, svg_path, title, xlabel, ylabel, smooth=1):
        figures[svg_path] = line_figure(lines, title, xlabel, ylabel, smooth)
        return [svg_path, svg_path.with_suffix(".png")]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(my_main, "plot_lines", keep_figure)
        rc = run_main("--source", "local", "--runs_dir", root / "runs", "--out", out, "--smooth", "5",
                      "--only", *GROUPS)
    return rc, out, figures


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_every_group_renders_offline(all_groups_rendered, name):
    rc, out, figures = all_groups_rendered
    assert rc == 0
    group = GROUPS[name]
    for filename, title, ylabel, points in ((group.train_file, group.train_title, group.train_label, 20),
                                            (group.test_file, group.test_title, group.test_label, 2)):
        ax = figures[out / name / filename].axes[0]
        assert ax.get_title() == title and ax.get_xlabel() == "step" and ax.get_ylabel() == ylabel
        assert [line.get_label() for line in ax.get_lines()] == [wrap_label(run.label, render.LEGEND_WIDTH)
                                                                 for run in group.runs]
        assert [line.get_color() for line in ax.get_lines()] == [run.color for run in group.runs]
        assert all(len(line.get_xdata()) == points for line in ax.get_lines())
    table = (out / name / group.table_filename).read_text()
    assert list(table_rows(table)) == [latex_escape(run.label) for run in group.runs]
    assert_compile_ready(table)


# ---------------------------------------------------------------------------------------------- compare, CLI, wandb

def test_compare_plots_local_runs(tmp_path):
    a = write_run(tmp_path, "run_a", [4.0, 3.5, 3.2], [3.4])
    b = write_run(tmp_path, "run_b", [4.1, 3.6, 3.1], [3.3], tokens_per_s=False)
    out = tmp_path / "cmp"
    assert run_main("--compare", a, b, tmp_path / "absent", "--out", out, "--smooth", "2") == 0
    for stem in ("train_loss", "test_loss", "tokens_per_s"):
        assert (out / f"{stem}.svg").is_file() and (out / f"{stem}.png").is_file()
    svg = (out / "train_loss.svg").read_text()
    assert "run_a" in svg and "run_b" in svg


def test_help_documents_everything_from_any_directory(tmp_path):
    script = Path(__file__).resolve().parents[1] / "wandb_graphs" / "my_main.py"
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                            check=True)
    for flag in ("--source", "--runs_dir", "--map", "--only", "--list", "--out", "--definitions", "--smooth",
                 "--seed_table_values", "--compare"):
        assert flag in result.stdout


def test_wandb_missing_gives_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert run_main("--source", "wandb", "--only", "1_base_models", "--out", tmp_path) == 1
    assert "pip install wandb" in capsys.readouterr().err


class FakeWandbRun:
    def __init__(self, run_id, rows):
        self.id, self.rows, self.scans = run_id, rows, []

    def scan_history(self, keys, page_size):
        self.scans.append((tuple(keys), page_size))
        return [row for row in self.rows if all(k in row for k in keys)]


def fake_wandb(runs_by_id, runs_by_name, fail_with=None, offline=False):
    errors = types.SimpleNamespace(Error=type("Error", (Exception,), {}))

    class Api:
        def __init__(self):
            if fail_with:
                raise errors.Error(fail_with)

        def run(self, path):
            if offline:
                raise ConnectionError("Connection refused")  # what requests raises, an OSError
            run_id = path.split("/")[-1]
            if run_id not in runs_by_id:
                raise ValueError(f"Could not find run {path}")
            return runs_by_id[run_id]

        def runs(self, project, filters):
            return [runs_by_name[filters["displayName"]]] if filters["displayName"] in runs_by_name else []

    return types.SimpleNamespace(Api=Api, errors=errors)


def test_wandb_source_with_a_fake_api(monkeypatch, tmp_path, capsys):
    rows = [{"_step": s, "loss": 3.0 + 1 / s} for s in range(10, 2010, 10)] + [{"_step": 2000, "test_loss": 2.9}]
    linear = FakeWandbRun("zfdskd9t", rows)
    softmax = FakeWandbRun("ea9ph22z", [{"_step": 10, "loss": 2.0}, {"_step": 20, "test_loss": 2.5}])
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb({"zfdskd9t": linear}, {"ea9ph22z": softmax}))
    out = tmp_path / "out"
    assert run_main("--source", "wandb", "--only", "1_base_models", "--out", out) == 0
    assert "qbcs9fqx" in capsys.readouterr().err
    assert ((("_step", "loss"), 100100) in linear.scans) and ((("_step", "test_loss"), 100100) in linear.scans)
    rows_out = table_rows((out / "1_base_models" / "table.txt").read_text())
    expected_train = np.mean([3.0 + 1 / s for s in range(10, 2010, 10)])
    assert rows_out["Linear"] == [f"{expected_train:.2f}", "2.90"] and rows_out["Softmax"] == ["2.00", "2.50"]


def test_wandb_without_api_key_or_network_gives_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb({}, {}, fail_with="No API key configured"))
    assert run_main("--source", "wandb", "--out", tmp_path) == 1
    err = capsys.readouterr().err
    assert "No API key configured" in err and "network" in err


def test_wandb_unreachable_mid_run_is_fatal_and_clear(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb({}, {}, offline=True))
    assert run_main("--source", "wandb", "--only", "1_base_models", "--out", tmp_path) == 1
    err = capsys.readouterr().err
    assert "gmongaras1/Mamba_Squared_Experiemnts/zfdskd9t" in err and "Connection refused" in err


# ---------------------------------------------------------------------------------------------- figure content

def test_wrap_label_breaks_attention_type_names_between_fields():
    wrapped = wrap_label(LONG_TYPE, 30).split("\n")
    assert "".join(wrapped) == LONG_TYPE and all(len(line) <= 30 for line in wrapped)
    assert all(line.endswith("__") for line in wrapped[:-1])  # broken only between configs fields
    assert wrap_label("x" * 70, 30).split("\n") == ["x" * 30, "x" * 30, "x" * 10]
    assert wrap_label("Conv (w=2) + A mask softplus + discretize", 30) == "Conv (w=2) + A mask softplus\n+ discretize"


def test_line_figure_marks_sparse_lines_and_keeps_every_label_on_the_canvas():
    steps = np.arange(0, 100_000, 10)
    lines = [Line("one test point", "red", np.array([2000]), np.array([3.0])),
             Line(LONG_TYPE, None, steps, 3 + 1 / (1 + steps))]
    fig = line_figure(lines, "Test loss vs step", "step", "Test loss")
    ax = fig.axes[0]
    drawn_lines = ax.get_lines()
    assert [line.get_marker() for line in drawn_lines] == ["o", "None"]  # a single point is visible
    np.testing.assert_array_equal(drawn_lines[0].get_xydata(), [[2000, 3.0]])
    np.testing.assert_allclose(drawn_lines[1].get_ydata(), 3 + 1 / (1 + steps))
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0] == "one test point" and texts[1].replace("\n", "") == LONG_TYPE
    assert max(len(line) for text in texts for line in text.split("\n")) <= render.LEGEND_WIDTH
    renderer = drawn(fig)
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))  # beside the data
    assert ax.get_window_extent(renderer).width > 0.6 * fig.bbox.width  # the plot is not squeezed
    assert_on_canvas(fig, [ax.title, ax.xaxis.label, ax.yaxis.label, legend, *shown(ax.xaxis),
                           *shown(ax.yaxis)])
    assert_no_overlap(fig, shown(ax.xaxis))
    assert [t.get_text() for t in shown(ax.xaxis)][-1] == "100k"


def test_many_runs_get_distinct_styles_and_legend_columns():
    lines = [Line(f"run {i}", None, np.arange(100), np.full(100, float(i))) for i in range(45)]
    fig = line_figure(lines, "Train loss", "step", "loss")
    drawn_lines = fig.axes[0].get_lines()
    styles = {(line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color()),
               line.get_linestyle()) for line in drawn_lines}
    assert len(styles) == 45
    assert fig.axes[0].get_legend()._ncols == 3
    assert_on_canvas(fig, [fig.axes[0].get_legend(), fig.axes[0].title])


def test_compare_draws_a_run_with_one_test_point_and_never_overwrites(tmp_path, monkeypatch):
    figures = []

    def recording_line_figure(*args, **kwargs):
        figures.append(line_figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(render, "line_figure", recording_line_figure)
    monkeypatch.setattr(my_main, "DEFAULT_OUT", tmp_path / "figures")
    a = write_run(tmp_path, "run_a", [4.0, 3.5, 3.2], [3.4])
    b = write_run(tmp_path, "run_b", [4.1, 3.6, 3.1], [3.3])
    assert run_main("--compare", a, b) == 0
    test_loss = next(fig for fig in figures if fig.axes[0].get_title() == "Test loss vs step")
    assert [line.get_marker() for line in test_loss.axes[0].get_lines()] == ["o", "o"]
    assert [line.get_xydata().tolist() for line in test_loss.axes[0].get_lines()] == [[[30, 3.4]], [[30, 3.3]]]
    first = tmp_path / "figures" / "compare" / "run_a+run_b" / "train_loss.png"
    before = first.read_bytes()
    assert run_main("--compare", a, tmp_path / "absent") == 0
    assert (tmp_path / "figures" / "compare" / "run_a" / "train_loss.png").is_file()
    assert first.read_bytes() == before


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert run_main("--compare", tmp_path) == 1
    one_line_error(capsys, f"my_main.py: error: no metrics.jsonl in any --compare directory ({tmp_path})")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    assert run_main("--compare", tmp_path) == 1
    assert "error: none of the --compare runs logged loss, test_loss, tokens_per_s" in capsys.readouterr().err
    bad = tmp_path / "defs.json"
    bad.write_text('{"defaults": {},\n "groups": [')
    assert run_main("--definitions", bad, "--list") == 1
    one_line_error(capsys, f"{bad}:2: not JSON")
    bad.write_text(json.dumps({"defaults": {}, "groups": [{"name": "g", "runs": [["id", "label", "no-colour"]]}]}))
    assert run_main("--definitions", bad, "--list") == 1
    one_line_error(capsys, f"{bad}: group 'g': unknown colour 'no-colour'")
    write_run(tmp_path / "runs", "r", [3.0], [3.0])
    (tmp_path / "map.json").write_text("[1]")
    assert run_main("--source", "local", "--runs_dir", tmp_path / "runs", "--map", tmp_path / "map.json") == 1
    one_line_error(capsys, "must be a JSON object")
    assert run_main("--source", "local", "--runs_dir", tmp_path / "nowhere") == 1
    one_line_error(capsys, "does not exist")


# ---------------------------------------------------------------------------------------------- NIAH heatmap

def niah_result(path, attention_type, accuracies, model_path="models/run"):
    """A niah.py results file: {context length (characters): accuracy}."""
    per_length = [{"context_length": n, "accuracy": a, "correct": round(4 * a), "total": 4,
                   "mean_prompt_tokens": n * 0.29} for n, a in accuracies.items()]
    path.write_text(json.dumps({"model_path": model_path, "attention_type": attention_type,
                                "per_length": per_length}))
    return path


def test_paper_heatmap_content():
    labels, columns, values = niah_heatmap.paper_table()
    fig = niah_heatmap.heatmap_figure(labels, columns, values)
    ax, colorbar_ax = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Mamba-2", "Softmax", "2Mamba"]
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "1024\n(≈355 tokens)"
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), values)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert len(cells) == 15 and cells[(0, 3)] == "0.03" and cells[(2, 4)] == "0.95"
    assert "characters" in ax.get_xlabel() and "(tokens)" not in ax.get_xlabel()
    assert colorbar_ax.get_ylabel() == "proportion correct"
    assert_on_canvas(fig, [ax.title, ax.xaxis.label, ax.yaxis.label, colorbar_ax.yaxis.label,
                           *ax.get_xticklabels(), *ax.get_yticklabels()])
    assert_no_overlap(fig, ax.get_xticklabels())


def test_heatmap_of_long_type_names_and_many_lengths_stays_readable(tmp_path):
    lengths = [300 * 2 ** i for i in range(10)]
    files = [niah_result(tmp_path / "a.json", TWO_MAMBA, dict(zip(lengths, np.linspace(1, 0, 10)))),
             niah_result(tmp_path / "b.json", LONG_TYPE, {n: 0.5 for n in lengths[:5]}),
             niah_result(tmp_path / "c.json", "softmax", {lengths[0]: 1.0}, "models/sm_x"),
             niah_result(tmp_path / "d.json", "softmax", {lengths[1]: 1.0}, "models/sm_y/")]
    labels, columns, values = niah_heatmap.table_from_results(files)
    assert labels == ["2Mamba", LONG_TYPE, "Softmax (sm_x)", "Softmax (sm_y)"]
    assert columns[1] == "600\n(≈174 tokens)" and values.shape == (4, 10) and np.isnan(values[1, 5])
    fig = niah_heatmap.heatmap_figure(labels, columns, values)
    ax, colorbar_ax = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2Mamba", "A", "Softmax (sm_x)", "Softmax (sm_y)"]
    key = fig._supxlabel.get_text()
    assert key.replace("\n", "") == f"A: {LONG_TYPE}"
    renderer = drawn(fig)
    assert ax.get_window_extent(renderer).width > 0.6 * fig.bbox.width  # not squeezed by the label
    assert_on_canvas(fig, [fig._supxlabel, ax.title, ax.xaxis.label, colorbar_ax.yaxis.label,
                           *ax.get_xticklabels(), *ax.get_yticklabels()])
    assert_no_overlap(fig, ax.get_xticklabels())
    assert len(ax.texts) == 10 + 5 + 1 + 1  # one annotation per tested cell, none for blanks


def test_heatmap_default_outputs_never_overwrite_each_other(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ours = niah_result(tmp_path / "mine.json", TWO_MAMBA, {1024: 1.0, 2048: 0.5})
    assert cli.run(niah_heatmap.main, [str(ours)]) == 0
    own = tmp_path / "niah_and_hs" / "results" / "niah_heatmap_mine.png"
    before = own.read_bytes()
    assert cli.run(niah_heatmap.main, []) == 0
    assert (tmp_path / "niah_and_hs" / "results" / "niah_heatmap_paper.png").is_file()
    assert own.read_bytes() == before
    assert "niah_heatmap_paper.svg" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [("5", "not a niah.py results file"), ('{"per_length": [',
                                                                                  ":1: not JSON"),
                                             ('{"per_length": [{"accuracy": 1}]}', "context_length"),
                                             ('{"per_length": []}', "empty per_length")])
def test_heatmap_bad_results_file_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "r.json").write_text(content)
    assert cli.run(niah_heatmap.main, [str(tmp_path / "r.json"), "--out", str(tmp_path / "x")], prog="h") == 1
    one_line_error(capsys, f"h: error: {tmp_path / 'r.json'}", message)
    assert not (tmp_path / "x.png").exists()


def test_heatmap_out_with_an_image_extension_names_both_files(tmp_path):
    ours = niah_result(tmp_path / "mine.json", TWO_MAMBA, {1024: 1.0})
    assert cli.run(niah_heatmap.main, [str(ours), "--out", str(tmp_path / "map.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("map*")) == ["map.png", "map.svg"]


def test_the_shipped_reproduction_renders_from_its_group_file(tmp_path):
    """docs/results: its group file renders the five runs with no --map, and the table's test column is each
    run's last logged test loss (read here straight from metrics.jsonl)."""
    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    out = tmp_path / "figures"
    assert run_main("--source", "local", "--runs_dir", results, "--definitions", results / "groups.json",
                    "--only", "docs_mini_2048", "--out", out) == 0
    rows = table_rows((out / "docs_mini_2048" / "table.txt").read_text())
    assert list(rows) == ["Softmax", "2Mamba", "2Mamba-E", "Mamba-2", "Linear"]
    for label, folder in zip(rows, ("softmax", "2mamba", "2mamba_e", "mamba", "linear")):
        lines = [json.loads(line) for line in (results / folder / "metrics.jsonl").read_text().splitlines()]
        last_test = [r["test_loss"] for r in lines if "test_loss" in r][-1]
        assert cell_value(rows[label][1]) == round(last_test, 3)
    shipped = (results / "figures" / "docs_mini_2048" / "table.txt").read_text()
    assert (out / "docs_mini_2048" / "table.txt").read_text() == shipped
