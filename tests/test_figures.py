"""wandb_graphs: figure definitions, local log reader, tables and plots, from synthetic run logs (CPU, offline)."""
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from wandb_graphs.definitions import load_groups, matplotlib_color
from wandb_graphs.local_runs import find_runs, load_run_history
from wandb_graphs.my_main import main
from wandb_graphs.render import latex_escape, trailing_mean

SEED_DEFINITIONS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "paper_figures.json"
GROUPS = {group.name: group for group in load_groups()}


def write_run(runs_dir, folder, train_losses, test_losses, wandb_id=None, log_every=10, test_every=None,
              tokens_per_s=True):
    """A run directory as our trainer writes it: train lines every log_every steps, eval lines apart."""
    run_dir = Path(runs_dir) / folder
    run_dir.mkdir(parents=True)
    config = {"run_name": folder, "wandb_name": folder, "wandb_id": wandb_id, "attention_type": "softmax",
              "model_size": "small", "seq_len": 2048}
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
    return main([str(a) for a in args])


# ---------------------------------------------------------------------------------------------- definitions

def test_definitions_are_the_22_paper_groups():
    assert len(GROUPS) == 22
    assert {"1_base_models", "T1_isolated_comp_table", "8.6_full_comp", "13_slimpj"} <= set(GROUPS)
    assert all(group.runs for group in GROUPS.values())


@pytest.mark.skipif(not SEED_DEFINITIONS.is_file(), reason="the spec's seed definitions are not beside the repo")
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
    assert "qbcs9fqx" in err and "Mamba-2" in err  # the missing run, by id and legend label
    assert "[12_pile] no run found" in err
    assert not (out / "12_pile").exists()
    rows = table_rows((out / "1_base_models" / "table.txt").read_text())
    assert list(rows) == ["Linear", "Softmax"]
    assert (out / "1_base_models" / "1_train_loss.svg").is_file()


def test_no_run_at_all_fails_and_unknown_group_lists_names(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_main("--source", "local", "--runs_dir", tmp_path / "empty", "--out", tmp_path / "out") == 1
    assert run_main("--source", "local", "--runs_dir", tmp_path / "empty", "--only", "nope") == 2
    assert "1_base_models" in capsys.readouterr().err
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
    """Short logs for every run id of the definitions; all groups rendered once."""
    root = tmp_path_factory.mktemp("all_groups")
    rng = np.random.default_rng(1)
    run_ids = sorted({run.run_id for group in GROUPS.values() for run in group.runs})
    for i, run_id in enumerate(run_ids):
        # short logs keep the test fast; folder names differ from the ids so matching goes through run_config
        write_run(root / "runs", f"local_run_{i}", 3 + rng.random(20), 3 + rng.random(2), wandb_id=run_id)
    out = root / "out"
    rc = run_main("--source", "local", "--runs_dir", root / "runs", "--out", out, "--smooth", "5")
    return rc, out


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_every_group_renders_offline(all_groups_rendered, name):
    rc, out = all_groups_rendered
    assert rc == 0
    group = GROUPS[name]
    for filename in (group.train_file, group.test_file):
        assert (out / name / filename).stat().st_size > 0
        assert (out / name / filename).with_suffix(".png").stat().st_size > 0
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
