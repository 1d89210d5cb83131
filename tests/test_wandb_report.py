"""W&B comparison: a real 2×2 Hydra multirun of the demo logged offline, read back from its
`.wandb` files, and the report / workspace specification `analysis.wandb_report --dry-run`
builds from it, with every network call refused."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analysis import wandb_report
from analysis.wandb_report import Study, StudyRun, build_report, spec
from rescue.reporting.wandb_logger import sweep_group
from rescue.reporting.wandb_offline import read_run

ROOT = Path(__file__).resolve().parents[1]
NOISE, P_CORRECT = ("0.1", "0.5"), ("0.4", "0.6")
SWEEP = [f"verifier.noise={','.join(NOISE)}", f"planner.p_correct={','.join(P_CORRECT)}"]
SMALL = ["dataset.num_samples=4", "max_n=4", "n_grid=[1,2,4]", "selection.bootstrap=50",
         "report.overlays=2", "report.plot=false", "pipeline.progress=false"]
NS = (1, 2, 4)
SELECTORS = ("verifier", "executor", "consensus", "first", "random", "oracle")
STAGES = ("plan", "execute", "verify")
SERIES = re.compile(r"^(?:[^/]+/)?(?:best_of_n|prefix)/[^/@]+/(?:giou|ciou)$")
SECTIONS = ["Quality vs N", "Study table", "Failures", "Samples", "Quality vs compute"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The sweep directory and the jobs' console output (W&B not silenced: it must be quiet)."""
    tmp = tmp_path_factory.mktemp("wandb_sweep")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") or k == "WANDB_MODE"}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb_dir"), HYDRA_FULL_ERROR="1",
               WANDB_CONFIG_DIR=str(tmp / "wandb_config"), WANDB_CACHE_DIR=str(tmp / "wc"),
               WANDB_DATA_DIR=str(tmp / "wd"), WANDB_DISABLE_GIT="true")
    out = tmp / "sweep"
    proc = subprocess.run([sys.executable, "run.py", "-m", f"hydra.sweep.dir={out}",
                           f"paths.cache_dir={tmp / 'cache'}", *SMALL, *SWEEP], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout + proc.stderr


def _offline(job: Path) -> Path:
    found = sorted((job / "wandb").glob("offline-run-*"))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_every_run_of_a_sweep_is_logged_for_comparison(sweep: tuple[Path, str]) -> None:
    out, console = sweep
    jobs = sorted(p for p in out.iterdir() if p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    runs = [read_run(_offline(j)) for j in jobs]
    assert all(r.exited for r in runs)

    # one study: the same group (named after the sweep dir), job_type and tags
    assert {r.group for r in runs} == {sweep_group(out)} and runs[0].group
    assert {r.job_type for r in runs} == {"run"}
    assert all(r.tags == runs[0].tags for r in runs)
    assert {"sweep", "simulated"} <= set(runs[0].tags)

    # the swept keys (not the constant overrides) named, their values as config columns
    for r in runs:
        assert r.config["study"]["swept"] == ["verifier.noise", "planner.p_correct"]
        assert r.config["study"]["multirun"] is True
        assert "dataset.num_samples=4" in r.config["study"]["overrides"]
    grid = {(str(r.config["verifier"]["noise"]), str(r.config["planner"]["p_correct"]))
            for r in runs}
    assert grid == set(itertools.product(NOISE, P_CORRECT))

    for job, r in zip(jobs, runs, strict=True):
        metrics = pd.read_csv(job / "metrics.csv")
        head = json.loads((job / "summary.json").read_text())
        best = metrics[(metrics.subset == "all") & (metrics.estimator == "best_of_n")]

        def value(sel: str, n: int, metric: str, best: pd.DataFrame = best) -> float:
            return best[(best.selector == sel) & (best.n == n)][metric].item()

        for sel, n, metric in itertools.product(SELECTORS, NS, ("giou", "ciou")):
            assert r.summary[f"{metric}@{n}/{sel}"] == pytest.approx(value(sel, n, metric))
        for sel in SELECTORS:
            assert r.summary[f"giou@max/{sel}"] == pytest.approx(value(sel, 4, "giou"))
        for n in NS:
            assert r.summary[f"oracle@{n}"] == pytest.approx(value("oracle", n, "giou"))
        assert r.summary["oracle@max"] == pytest.approx(value("oracle", 4, "giou"))
        assert r.summary["gain"] == pytest.approx(value("verifier", 4, "giou")
                                                  - value("verifier", 1, "giou"))
        for stage in STAGES:
            assert r.summary[f"failure_share/{stage}"] == pytest.approx(
                head["failure_share"][stage])
        assert "failure_share" not in r.summary  # flat, not a nested block
        # curves stay curves: the per-N series are history keyed by n, not summary entries
        assert "n" not in r.summary and not [k for k in r.summary if SERIES.match(k)]
        by_n = {row["n"]: row for row in r.history if "n" in row}
        assert sorted(by_n) == list(NS)
        assert by_n[2]["best_of_n/verifier/giou"] == pytest.approx(value("verifier", 2, "giou"))

        # the per-(subset, estimator, selector, N) numbers as a W&B Table
        ref = r.summary["metrics_table"]
        assert ref["_type"] == "table-file" and ref["nrows"] == len(metrics)
        table = json.loads((_offline(job) / "files" / ref["path"]).read_text())
        assert {"subset", "estimator", "selector", "n", "giou", "ciou"} <= set(table["columns"])
        rows = pd.DataFrame(table["data"], columns=table["columns"])
        pd.testing.assert_series_equal(rows.giou.astype(float), metrics.giou, check_names=False)
        assert r.summary["samples_table"]["nrows"] == 2

    # quiet console: no W&B history sparklines or summary table at finish
    assert "Run summary" not in console and "Run history" not in console


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _table_keys(panel: dict) -> set[str]:
    """The summary table a Weave summary-table panel picks (`runs.summary[<key>]`)."""
    return {d["key"]["val"] for d in _walk(panel) if isinstance(d.get("key"), dict)
            and d["key"].get("nodeType") == "const" and isinstance(d["key"].get("val"), str)}


def _config_path(accessor: str) -> list[str]:
    """`config:verifier.value.noise` → ["verifier", "noise"] (wandb-workspaces' nested form)."""
    head, _, rest = accessor.removeprefix("config:").partition(".value")
    return [head, *[p for p in rest.split(".") if p]]


def _has_config(config: dict, path: list[str]) -> bool:
    node: Any = config
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def _panel_keys(panel: dict) -> dict[str, set[str]]:
    """What a panel reads, by where it must exist: history, summary, config, summary tables."""
    c, kind = panel["config"], panel["viewType"]
    keys: dict[str, set[str]] = {"history": set(), "summary": set(), "config": set(),
                                 "table": set()}
    if kind == "Run History Line Plot":
        keys["history"] |= {c["xAxis"], *c["metrics"]}
    elif kind == "Bar Chart":
        keys["summary"] |= {m.removeprefix("summary_metrics.") for m in c["metrics"]}
    elif kind == "Scatter Plot":
        keys["summary"] |= {c["xAxis"].removeprefix("summary:"),
                            c["yAxis"].removeprefix("summary:")}
    elif kind == "Parallel Coordinates Plot":
        for col in c["columns"]:
            section = "config" if col["accessor"].startswith("config:") else "summary"
            keys[section].add(col["accessor"] if section == "config"
                              else col["accessor"].removeprefix("summary:"))
    elif kind == "Media Browser":
        keys["history"] |= set(c["mediaKeys"])
    elif kind == "Weave":
        keys["table"] |= _table_keys(panel)
    else:
        raise AssertionError(f"unexpected panel {kind}")
    return keys


def _assert_keys_exist(keys: dict[str, set[str]], runs: list[Any], where: str) -> None:
    assert any(keys.values()), f"{where} reads nothing"
    for r in runs:
        history = {k for row in r.history for k in row}
        assert keys["history"] <= history, (where, keys["history"] - history)
        assert keys["summary"] <= set(r.summary), (where, keys["summary"] - set(r.summary))
        for accessor in keys["config"]:
            assert _has_config(r.config, _config_path(accessor)), (where, accessor)
        for table in keys["table"]:
            assert r.summary[table]["_type"] == "table-file", (where, table)


@pytest.mark.slow
def test_dry_run_builds_a_report_of_the_group_without_any_network(
        sweep: tuple[Path, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = sweep
    runs = [read_run(_offline(j)) for j in sorted(out.glob("[0-9]"))]
    group = runs[0].group
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("WANDB_MODE", "offline")

    assert wandb_report.main([str(out), "--dry-run"]) == 0
    assert attempts == []
    printed = capsys.readouterr().out
    assert "wandb sync" in printed and str(_offline(out / "0")) in printed

    report = json.loads((out / "wandb_report.json").read_text())
    assert report["project"]["name"] == "rescue" and group in report["displayName"]
    blocks = report["spec"]["blocks"]
    headings = [b["children"][0]["text"] for b in blocks if b["type"] == "heading"]
    assert headings == SECTIONS
    grids = [b for b in blocks if b["type"] == "panel-grid"]
    assert len(grids) == 4  # no `cost/...` keys yet: the compute section is text only
    assert any("No `cost/...`" in json.dumps(b) for b in blocks if b["type"] == "paragraph")

    titles, tables = set(), set()
    for grid in grids:
        for runset in grid["metadata"]["runSets"]:  # bound to the runs of the group
            assert runset["filters"]["filters"] == [
                {"key": {"section": "run", "name": "group"}, "op": "=", "value": group,
                 "disabled": False}]
            pinned = runset["runFeed"]["columnOrder"]
            assert pinned[:2] == ["config:verifier.value.noise",
                                  "config:planner.value.p_correct"]
            assert {"summary:giou@max/verifier", "summary:oracle@max", "summary:gain"} <= set(
                pinned)
            _assert_keys_exist({"history": set(), "table": set(),
                                "config": {c for c in pinned if c.startswith("config:")},
                                "summary": {c.removeprefix("summary:") for c in pinned
                                            if c.startswith("summary:")}}, runs, "runs table")
        for panel in grid["metadata"]["panelBankSectionConfig"]["panels"]:
            title = panel["config"].get("chartTitle")
            titles.add(title)
            keys = _panel_keys(panel)
            tables |= keys["table"]
            _assert_keys_exist(keys, runs, title or panel["viewType"])
    for metric in ("gIoU", "cIoU"):
        for sel in SELECTORS[:-1]:
            assert f"{metric} vs N: {sel} (oracle dashed)" in titles
    assert {"Swept keys vs headline", "gIoU@max of verifier per run (and the oracle)",
            "Failure share per stage", "Replies cut off at max_tokens",
            "Sample overlays, one column per run"} <= titles
    assert tables == {"metrics_table", "samples_table"}

    # the saved workspace view: the same sections, the same runs
    view = json.loads((out / "wandb_workspace.json").read_text())
    section = view["spec"]["section"]
    assert [s["name"] for s in section["panelBankConfig"]["sections"]] == SECTIONS[:-1]
    assert section["runSets"][0]["filters"]["filters"][0]["value"] == group
    assert section["settings"]["xAxis"] == "n"
    for s in section["panelBankConfig"]["sections"]:
        for panel in s["panels"]:
            _assert_keys_exist(_panel_keys(panel), runs, f"workspace {s['name']}")


def _run(rid: str, summary: dict[str, Any]) -> StudyRun:
    return StudyRun(run_id=rid, name=rid, group="g", config={"verifier": {"noise": 0.1}},
                    summary={"primary": "verifier", "giou@max/verifier": 0.5,
                             "giou@max/oracle": 0.7, **summary})


def _scatter(study: Study) -> list[dict]:
    return [d for d in _walk(spec(build_report(study))) if d.get("viewType") == "Scatter Plot"]


def test_quality_vs_compute_appears_when_every_run_has_cost_keys() -> None:
    costs = [_run("a", {"cost/model_calls": 10, "cost/seconds": 3.0}),
             _run("b", {"cost/model_calls": 40, "cost/seconds": 9.5, "cost/gpu_s": 1.0})]
    study = Study(group="g", project="p", entity="", runs=tuple(costs),
                  swept=("verifier.noise",))
    assert study.cost_keys == ["cost/model_calls", "cost/seconds"]  # gpu_s: one run only
    plots = _scatter(study)
    assert [(p["config"]["xAxis"], p["config"]["yAxis"]) for p in plots] == [
        ("summary:cost/model_calls", "summary:giou@max/verifier"),
        ("summary:cost/seconds", "summary:giou@max/verifier")]
    bare = Study(group="g", project="p", entity="", runs=(_run("a", {}), _run("b", {})))
    assert bare.cost_keys == [] and _scatter(bare) == []


def test_a_group_name_offline_gives_a_spec_from_the_conventions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert wandb_report.main(["my-study", "--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "wandb_report.json").read_text())
    text = json.dumps(report)
    assert '"value": "my-study"' in text and "best_of_n/verifier/giou" in text
    assert "WANDB_MODE=online python -m analysis.wandb_report my-study" in capsys.readouterr().out


def test_a_directory_without_wandb_runs_is_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.csv").write_text("x\n")
    assert wandb_report.main([str(tmp_path), "--dry-run"]) == 2
    assert "no offline W&B run" in capsys.readouterr().err
