"""The study layer over real run directories: made once per module by the real demo, small."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from named_settings import evaluate_named, settings_of

from analysis import compare, rescore
from analysis.runs import (
    NoRunsError,
    find_runs,
    load_run,
    load_runs,
    newest_run,
    run_labels,
    study_table,
    user_path,
)
from rescue import records

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dataset.num_samples=6", "max_n=4", "n_grid=[1,2,4]", "selection.bootstrap=50",
         "report.overlays=1", "logger=none", "pipeline.progress=false"]
CI = ["subset", "estimator", "n", "giou", "ciou", "giou_lo", "giou_hi", "ciou_lo", "ciou_hi",
      "num_samples", "num_failed_samples"]

pytestmark = pytest.mark.slow


def _run(*args: str) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "run.py", *args, *SMALL], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A single run (the demo's defaults) and a two-job multirun over the verifier's noise."""
    tmp = tmp_path_factory.mktemp("runs")
    cache = f"paths.cache_dir={tmp / 'cache'}"
    _run(f"hydra.run.dir={tmp / 'single'}", cache)
    _run("-m", "verifier.noise=0.05,0.6", f"hydra.sweep.dir={tmp / 'sweep'}", cache)
    return {"single": tmp / "single", "sweep": tmp / "sweep", "tmp": tmp}


def test_find_runs_single_and_multirun(made):
    single, sweep = made["single"], made["sweep"]
    assert find_runs([single]) == [single.resolve()]
    assert find_runs([sweep]) == [(sweep / "0").resolve(), (sweep / "1").resolve()]
    # order kept, a run named twice listed once
    both = find_runs([sweep, single, sweep / "1"])
    assert both == [(sweep / "0").resolve(), (sweep / "1").resolve(), single.resolve()]


def test_find_runs_errors_name_the_directory(tmp_path):
    (tmp_path / "empty" / "0").mkdir(parents=True)
    with pytest.raises(NoRunsError, match="empty holds no run"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(NoRunsError, match="no such directory"):
        find_runs([tmp_path / "missing"])


def test_load_run_reads_config_overrides_metrics_stats(made):
    run = load_run(made["sweep"] / "1")
    assert "verifier.noise=0.6" in run.overrides
    assert run.override_values()["verifier.noise"] == "0.6"
    assert run.config["max_n"] == 4 and run.config["verifier"]["noise"] == 0.6
    assert run.choices["verifier"] == "simulated"
    assert set(run.metrics["n"]) == {1, 2, 4}
    assert run.stats["calls"]["samples"] == 6
    assert run.simulated is True
    assert len(run.records()) == 6
    # settings no override named: the group's option, else the config value (demo: noise 0.3)
    single = load_run(made["single"])
    assert single.setting("verifier") == "simulated"
    assert single.setting("verifier.noise") == "0.3"
    assert single.setting("n_grid") == "[1,2,4]"


def test_an_evaluate_run_reads_the_records_it_evaluated(made, tmp_path):
    """`mode=evaluate` writes metrics but no records: they stay in `records_from`."""
    ev = tmp_path / "ev"
    (ev / ".hydra").mkdir(parents=True)
    (ev / "metrics.csv").write_bytes((made["single"] / "metrics.csv").read_bytes())
    (ev / ".hydra" / "config.yaml").write_text(
        f"mode: evaluate\nrecords_from: {made['single']}\n")
    run = load_run(ev)
    assert run.records_path == made["single"] / "records.jsonl"
    assert run.simulated is True  # from those records: no stats.json, no summary.json
    assert [r.sample_id for r in run.records()] == [
        r.sample_id for r in load_run(made["single"]).records()]


def test_study_table_has_one_column_per_varying_override(made):
    runs = [load_run(p) for p in find_runs([made["sweep"]])]
    table = study_table(runs)
    assert table.attrs["varying"] == ["verifier.noise"]
    assert "max_n" not in table.columns and "paths.cache_dir" not in table.columns
    assert sorted(table["verifier.noise"].unique()) == [0.05, 0.6]
    assert table["verifier.noise"].dtype.kind == "f"
    assert len(table) == sum(len(r.metrics) for r in runs)
    assert list(table["run"].unique()) == ["verifier.noise=0.05", "verifier.noise=0.6"]
    one = table[table["run"] == "verifier.noise=0.6"].drop(
        columns=["run", "run_dir", "simulated", "verifier.noise"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(one, runs[1].metrics)
    # adding the single run (noise 0.3 from the demo config, not an override) keeps the axis
    runs3 = [*runs, load_run(made["single"])]
    table3 = study_table(runs3)
    assert sorted(table3["verifier.noise"].unique()) == [0.05, 0.3, 0.6]
    assert len(set(run_labels(runs3))) == 3


def test_compare_writes_csv_md_plot_with_every_run(made, tmp_path):
    out = tmp_path / "study"
    paths = compare.compare([made["sweep"], made["single"]], out)
    assert paths == {"csv": out / "study.csv", "md": out / "study.md",
                     "plot": out / "study_iou_vs_n.png", "frontier": out / "study_frontier.md",
                     "frontier_plot": out / "study_giou_frontier.png"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["frontier_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frontier = paths["frontier"].read_text()  # quality per unit of compute, across the runs
    assert "Pareto frontier" in frontier and "reaching X% of the best gIoU" in frontier
    assert "oracle" not in frontier and "SIMULATED" in frontier
    md = paths["md"].read_text()
    assert "SIMULATED" in md
    runs = [load_run(p) for p in find_runs([made["sweep"], made["single"]])]
    labels = run_labels(runs)
    for label, run in zip(labels, runs, strict=True):
        assert f"`{label}`" in md and str(run.path) in md
    # the verifier table: rows N, each cell the run's gIoU with its interval
    header = next(line for line in md.splitlines() if line.startswith("| N | "))
    assert header.count("`") == 2 * len(runs)
    row4 = next(line for line in md.splitlines() if line.startswith("| 4 | "))
    m = runs[0].metrics
    v = m[(m.selector == "verifier") & (m.estimator == "best_of_n") & (m.subset == "all")
          & (m.n == 4)].iloc[0]
    assert f"{100 * v.giou:.1f} [{100 * v.giou_lo:.1f}, {100 * v.giou_hi:.1f}]" in row4
    csv = pd.read_csv(paths["csv"])
    assert set(csv["run"]) == set(labels) and len(csv) == sum(len(r.metrics) for r in runs)


def _legend_title(fig) -> str:
    legend = fig.axes[0].get_legend() or fig.legends[0]
    return legend.get_title().get_text()


def test_study_plot_draws_each_oracle_above_every_line_and_states_the_level(made, tmp_path):
    runs = [load_run(p) for p in find_runs([made["sweep"]])]
    fig = compare.study_figure(study_table(runs), runs)
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata())]
    solid = [ln for ln in lines if ln.get_linestyle() == "-"]
    oracles = [ln for ln in lines if ln.get_linestyle() != "-"]
    assert len(solid) == len(oracles) == 2
    # an oracle equal to a run's line (N=1: every selector agrees) still shows, on top
    assert min(o.get_zorder() for o in oracles) > max(ln.get_zorder() for ln in solid)
    assert {o.get_color() for o in oracles} == {ln.get_color() for ln in solid}
    assert _legend_title(fig) == "shaded: 95% bootstrap CI over samples (50 resamples)"
    # runs evaluated at different levels: each level named
    ev = tmp_path / "ev90"
    _run("mode=evaluate", f"records_from={made['single']}", "selection.ci=0.9",
         f"hydra.run.dir={ev}")
    both = [load_run(made["single"]), load_run(ev)]
    title = _legend_title(compare.study_figure(study_table(both), both))
    assert "per run" in title and "90%" in title and "95%" in title


def test_rescore_plot_gives_the_new_selector_its_own_colour_and_band(made, tmp_path,
                                                                    monkeypatch):
    from matplotlib.colors import to_hex

    from rescue import selection
    from rescue.reporting import plots

    drawn = []
    monkeypatch.setattr(plots, "save_png",
                        lambda fig, out, simulated=False: drawn.append(fig) or Path(out))
    rescore.rescore_run(made["sweep"] / "0", {"verifier": 1.0, "consensus": 0.5}, name="mix",
                        out_dir=tmp_path)
    (fig,) = drawn
    ax = fig.axes[0]
    colors = {ln.get_label(): ln.get_color() for ln in ax.get_lines()}
    assert colors["verifier"] == selection.VERIFIER.color
    assert colors["mix"] not in {s.color for s in selection.SELECTORS.values()}
    assert len(set(colors.values())) == len(colors)
    shaded = [to_hex(c.get_facecolor()[0]) for c in ax.collections]
    assert shaded == [selection.ORACLE.color, colors["mix"]]  # the question and the bound
    assert _legend_title(fig) == "shaded: 95% bootstrap CI over samples (50 resamples)"


def test_compare_cli_defaults_out_and_fails_clearly(made, tmp_path):
    cmd = [sys.executable, "-m", "analysis.compare"]
    ok = subprocess.run([*cmd, str(made["sweep"]), "--metric", "ciou"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (made["sweep"] / "study_ciou_vs_n.png").is_file()
    assert "cIoU" in (made["sweep"] / "study.md").read_text()
    (tmp_path / "nothing").mkdir()
    bad = subprocess.run([*cmd, str(tmp_path / "nothing")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert "holds no run" in bad.stderr and "nothing" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_rescore_single_weight_reproduces_the_selector_exactly(made, tmp_path):
    run_dir = made["sweep"] / "0"
    paths = rescore.rescore_run(run_dir, {"verifier": 1.0}, name="v1", out_dir=tmp_path)
    got = pd.read_csv(paths["csv"])
    original = pd.read_csv(run_dir / "metrics.csv")
    for sel, ref in (("v1", "verifier"), ("consensus", "consensus")):
        a = got[got.selector == sel][CI].reset_index(drop=True)
        b = original[original.selector == ref][CI].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert (tmp_path / "iou_vs_n_rescore_verifier-1.png").is_file()


def test_rescore_base_table_equals_the_runs_metrics_csv(made, tmp_path):
    """The run's own settings, not the defaults: evaluated with a fixed 2 consensus
    draws, the rescored base table is that run's metrics.csv. (On the demo's
    small pools consensus is now exact at every N whatever the draws: closed forms at N = 1, 2,
    one subset at N = M; so the draws no longer move its numbers here.)"""
    ev = tmp_path / "ev"
    _run("mode=evaluate", f"records_from={made['single']}", "selection.consensus_draws=2",
         "selection.consensus_pilot=2", "selection.consensus_se=0", f"hydra.run.dir={ev}")
    metrics = pd.read_csv(ev / "metrics.csv")
    paths = rescore.rescore_run(ev, {"verifier": 1.0}, name="v1", out_dir=tmp_path / "re",
                                plot=False)
    base = pd.read_csv(paths["csv"])
    pd.testing.assert_frame_equal(base[base.selector != "v1"].reset_index(drop=True), metrics,
                                  check_exact=True)
    config = (ev / ".hydra" / "config.yaml").read_text()
    assert "consensus_draws: 2" in config and "consensus_se: 0" in config  # the run's own


def test_rescore_scale_invariance_and_a_real_combination(made):
    recs = list(records.read(made["sweep"] / "1" / "records.jsonl"))
    grid, kw = [1, 2, 4], {"bootstrap": 0, "seed": 0}
    settings = settings_of(grid, ["consensus"], **kw)
    ref = evaluate_named(recs, grid, ["consensus"], **kw)
    # a rescored term is a fixed per-candidate score (consensus: pool-level), so only its
    # scale is tested here; the consensus selector itself is scored within subsets
    unit = rescore.rescore(recs, {"consensus": 1.0}, "c", settings)
    scaled = rescore.rescore(recs, {"consensus": 3.0}, "c", settings)
    np.testing.assert_array_equal(scaled["giou"], unit["giou"])
    at_max = (unit.n == 4) & (unit.estimator == "best_of_n")
    assert not unit[at_max].empty
    # a combination never beats the oracle, and at N=1 (no selection) equals every selector
    combo = rescore.rescore(recs, {"verifier": 1.0, "consensus": 0.5}, "combo", settings)
    oracle = evaluate_named(recs, grid, ["oracle"], **kw)
    assert (combo["giou"].to_numpy() <= oracle["giou"].to_numpy() + 1e-12).all()
    at1 = combo[(combo.n == 1) & (combo.estimator == "best_of_n") & (combo.subset == "all")]
    assert at1["giou"].item() == pytest.approx(
        ref[(ref.n == 1) & (ref.estimator == "best_of_n") & (ref.subset == "all")]["giou"].item())


def test_combined_scores_by_hand():
    from rescue.records import CandidateRecord, SampleRecord

    cands = [CandidateRecord(index=0, verifier_score=0.9, consensus=0.2, intersection=1, union=2),
             CandidateRecord(index=1, verifier_score=0.1, consensus=0.6, intersection=1, union=2),
             CandidateRecord(index=2, verifier_score=None, consensus=0.4, failed_stage="verify"),
             CandidateRecord(index=3, failed_stage="plan", error="parse:no_json")]
    rec = SampleRecord("s", "d", "q", 4, 4, 2, True, candidates=cands)
    s = rescore.combined_selector({"verifier": 1.0, "consensus": 1.0}).scores(rec.candidates)
    # verifier z over the two scored: +1, -1; the unscored gets -1 - 1 = -2
    # consensus z over the three working: (0.2, 0.6, 0.4) -> (-1.2247, 1.2247, 0)
    zc = (np.array([0.2, 0.6, 0.4]) - 0.4) / np.std([0.2, 0.6, 0.4])
    np.testing.assert_allclose(s[:3], np.array([1.0, -1.0, -2.0]) + zc)
    assert s[3] == -np.inf


def test_parse_weights_rejects_bad_input():
    assert rescore.parse_weights("verifier=1, consensus=0.5") == {"verifier": 1.0,
                                                                  "consensus": 0.5}
    for bad, msg in (("nope=1", "unknown selector"), ("verifier", "selector=weight"),
                     ("verifier=x", "not a number"), ("verifier=-1", ">= 0"),
                     ("verifier=0", "no positive weight"), ("verifier=1,verifier=2", "twice")):
        with pytest.raises(ValueError, match=msg):
            rescore.parse_weights(bad)


def test_rescore_cli_writes_next_to_the_run(made):
    run_dir = made["sweep"] / "1"
    proc = subprocess.run([sys.executable, "-m", "analysis.rescore", str(run_dir),
                           "--selector-weights", "verifier=1,consensus=0.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(run_dir / "metrics_rescore_verifier-1_consensus-0.5.csv")
    assert {"verifier", "oracle", "1*verifier+0.5*consensus"} <= set(table.selector)
    md = (run_dir / "metrics_rescore_verifier-1_consensus-0.5.md").read_text()
    assert "1*verifier+0.5*consensus" in md and "SIMULATED" in md


def test_notebook_runs_as_its_first_cell_says(made, tmp_path):
    """The command in the notebook's first cell, from the repo root, with RESCUE_RUN relative
    (the kernel's own working directory is analysis/: a path resolved there is not found)."""
    path = ROOT / "analysis" / "multi_n.ipynb"
    json.loads(path.read_text())  # valid JSON as committed
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    (line,) = [t.strip() for t in nb.cells[0].source.splitlines() if "jupyter execute" in t]
    rel = os.path.relpath(made["single"], ROOT)
    assert not Path(rel).is_absolute() and not (ROOT / "analysis" / rel).exists()
    executed = tmp_path / "executed"
    line = line.replace("outputs/runs/demo/<time>", rel).replace(
        "--output=multi_n_run", f"--output={executed}")
    env = {k: v for k, v in os.environ.items() if k not in ("RESCUE_RUN", "PWD")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = nbformat.read(executed.with_suffix(".ipynb"), as_version=4)
    outputs = [o for c in done.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    text = "".join(o.get("text", "") for o in outputs)
    assert str(made["single"].resolve()) in text and "primary selector: verifier" in text


def test_the_notebook_names_only_tooling_of_the_dev_extra():
    import re

    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = re.search(r"^dev = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    text = (ROOT / "analysis" / "multi_n.ipynb").read_text()
    assert "jupyter execute" in text and "nbclient" in dev and "ipykernel" in dev
    for tool, package in (("jupyter lab", "jupyterlab"), ("jupyter notebook", "notebook"),
                          ("jupyter nbconvert", "nbconvert")):
        assert tool not in text or package in dev, tool


def test_a_relative_records_from_resolves_against_the_evaluate_runs_launch_dir(
        made, tmp_path, monkeypatch):
    rel = os.path.relpath(made["single"], ROOT)
    ev, ev2 = tmp_path / "ev", tmp_path / "ev2"
    _run("mode=evaluate", f"records_from={rel}", f"hydra.run.dir={ev}")
    # an evaluate run of that evaluate run: the chain leads to the records
    _run("mode=evaluate", f"records_from={os.path.relpath(ev, ROOT)}", f"hydra.run.dir={ev2}")
    monkeypatch.chdir(tmp_path)  # read back from elsewhere than the launch directory
    want = (made["single"] / "records.jsonl").resolve()
    for run_dir in (ev, ev2):
        run = load_run(run_dir)
        assert run.records_path.resolve() == want
        assert len(run.records()) == 6 and run.simulated is True
    assert (ev2 / "metrics.csv").read_text() == (ev / "metrics.csv").read_text()


def test_peer_methods_fails_in_one_line_on_a_config_it_cannot_evaluate(made, tmp_path):
    """A run whose saved config EvaluationSettings refuses: one line naming the key, exit 2, no
    traceback, as analysis.rescore and analysis.compare (peer_methods reads its first run's)."""
    import shutil

    import yaml

    run_dir = tmp_path / "old"
    shutil.copytree(made["single"], run_dir)
    for f in (run_dir / "config_resolved.yaml", run_dir / ".hydra" / "config.yaml"):
        cfg = yaml.safe_load(f.read_text())
        cfg["max_n"] = 0
        f.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="max_n must be an integer >= 1"):
        load_run(run_dir).evaluation_settings()
    proc = subprocess.run([sys.executable, "-m", "analysis.peer_methods", str(run_dir),
                           str(made["single"]), "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "max_n must be an integer >= 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "peer_methods.md").exists()


def test_analysis_skips_failed_and_empty_run_directories(made, tmp_path, caplog):
    import shutil

    study = tmp_path / "study"
    for job in ("0", "1"):
        shutil.copytree(made["sweep"] / job, study / job)
    for job in ("2", "3"):  # Hydra's config only: failed early (3 says so) or still running
        shutil.copytree(made["sweep"] / "0" / ".hydra", study / job / ".hydra")
    (study / "3" / "FAILED").write_text("rescue: max_n must be an integer >= 1\n")
    runs = load_runs([study])
    assert [r.path for r in runs] == [(study / "0").resolve(), (study / "1").resolve()]
    assert "skipping 1 run directory without results" in caplog.text
    assert str((study / "2").resolve()) in caplog.text
    md = compare.compare([study], tmp_path / "out")["md"].read_text()
    assert "2 runs" in md.splitlines()[0] and "study/2" not in md and "study/3" not in md
    with pytest.raises(NoRunsError, match="no run with results"):
        load_runs([study / "2"])


def test_user_path_prefers_the_callers_directory_then_the_repo_root(tmp_path):
    (tmp_path / "here" / "runs" / "a").mkdir(parents=True)
    (tmp_path / "root" / "runs" / "b").mkdir(parents=True)
    env = {"PWD": str(tmp_path / "here")}
    assert user_path("runs/a", tmp_path / "root", env) == tmp_path / "here" / "runs" / "a"
    assert user_path("runs/b", tmp_path / "root", env) == tmp_path / "root" / "runs" / "b"
    assert user_path(tmp_path / "x", tmp_path / "root", env) == tmp_path / "x"
    assert user_path("runs/none", tmp_path / "root", env) == tmp_path / "here" / "runs" / "none"
    assert user_path("runs/b", tmp_path / "root", {}) == tmp_path / "root" / "runs" / "b"


def test_newest_run(made):
    assert newest_run(made["tmp"]) in {made["single"], made["sweep"] / "0", made["sweep"] / "1"}
    (made["sweep"] / "1" / "metrics.csv").touch()
    assert newest_run(made["tmp"]) == made["sweep"] / "1"


def test_the_frontier_figure_draws_exactly_the_pareto_rows():
    points = pd.DataFrame({
        "run": ["a", "a", "a", "b", "b", "b"], "selector": ["verifier"] * 3 + ["first"] * 3,
        "n": [1, 2, 4] * 2, "giou": [0.3, 0.5, 0.6, 0.35, 0.4, 0.45],
        "total_tokens": [100.0, 200.0, 400.0, 50.0, 300.0, 600.0]})
    fig = compare.frontier_figure(points)
    (ax,) = fig.axes
    front = [ln for ln in ax.get_lines() if ln.get_color() == "black"]
    assert len(front) == 1
    want = compare.pareto_frontier(points)
    assert list(want["total_tokens"]) == [50.0, 200.0, 400.0]  # b@1, a@2, a@4; the rest dominated
    np.testing.assert_allclose(front[0].get_xdata(), want["total_tokens"])
    np.testing.assert_allclose(front[0].get_ydata(), 100 * want["giou"])
    assert len(ax.get_lines()) == 3  # one faint line per (run, selector), and the frontier
