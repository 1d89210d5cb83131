"""W&B logger: a real offline run read back from its .wandb log, mode rules, never fatal."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from reporting_fakes import NS, SELECTORS, metrics_frame, overlay_item

from rescue.reporting import NullLogger, log_report, summary, write_report
from rescue.reporting.logger import Logger
from rescue.reporting.wandb_logger import (
    WandbLogger,
    config_column,
    default_mode,
    flat_summary,
    study_context,
    summary_keys,
)
from rescue.reporting.wandb_offline import raw_records, read_run


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, silent, and every W&B directory inside tmp_path."""
    home = tmp_path / "wandb_home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


@pytest.mark.parametrize(("env", "mode"), [
    ({}, "offline"),
    ({"WANDB_API_KEY": "x" * 40}, "online"),
    ({"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}, "offline"),
    ({"WANDB_MODE": "disabled"}, "disabled"),
    ({"WANDB_MODE": ""}, "offline"),
])
def test_default_mode(env: dict[str, str], mode: str) -> None:
    assert default_mode(env) == mode


def test_explicit_mode_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # CI exports WANDB_MODE=offline
    assert WandbLogger().mode == "online"
    assert WandbLogger(mode="offline").mode == "offline"


def test_loggers_satisfy_the_protocol() -> None:
    assert isinstance(WandbLogger(), Logger) and isinstance(NullLogger(), Logger)


def test_real_offline_run_holds_config_metrics_images_and_summary(wandb_env: Path) -> None:
    out = wandb_env / "run"
    df = metrics_frame(subsets=("all", "long"))
    items = [overlay_item("a"), overlay_item("b", selected=None)]
    paths = write_report(out, [items[0].record], df, items, simulated=True)
    logger = WandbLogger(project="rescue-test", dir=out, group="study-1", tags=("demo",))
    config = {"max_n": 16, "planner": {"model": "sim", "temperature": 0.7}}
    logger.start(config, name="demo-run", tags=["run"], simulated=True)
    log_report(logger, paths, df, items)
    logger.finish()
    logger.finish()  # twice is harmless

    assert logger.errors == []
    assert logger.run_dir is not None and logger.run_dir.parent == out / "wandb"
    assert logger.run_dir.name.startswith("offline-run-")
    run = read_run(logger.run_dir)
    assert run.exited and run.project == "rescue-test" and run.group == "study-1"
    assert run.name == "demo-run" and run.job_type == "run"
    assert run.tags == ["demo", "run", "simulated"]
    assert run.config["max_n"] == 16 and run.config["planner"]["temperature"] == 0.7

    head = summary(df)
    assert run.summary["giou@max"] == pytest.approx(head["giou@max"])
    assert run.summary["oracle/giou@max"] == pytest.approx(head["oracle/giou@max"])
    assert run.summary["simulated"] is True and run.summary["num_candidates"] == 7
    # flat comparison keys, the same in every run; the curves stay out of the summary
    best = df[(df.subset == "all") & (df.estimator == "best_of_n")]
    for sel in SELECTORS:
        assert run.summary[f"giou@4/{sel}"] == pytest.approx(
            best[(best.selector == sel) & (best.n == 4)].giou.item())
    assert run.summary["oracle@max"] == pytest.approx(head["oracle/giou@max"])
    assert run.summary["gain"] == pytest.approx(head["gain@max"])
    assert run.summary["failure_share/plan"] == pytest.approx(1 / 7)
    assert not [k for k in run.summary if k.endswith(("/giou", "/ciou")) or k == "n"]
    assert run.config["study"]["group"] == "study-1" and run.config["study"]["multirun"] is False

    # one history row per N carrying every selector's series, keyed for `n` as x axis
    by_n = {row["n"]: row for row in run.history if "n" in row}
    assert sorted(by_n) == list(NS)
    for sel in SELECTORS:
        want = df[(df.subset == "all") & (df.estimator == "best_of_n") & (df.selector == sel)
                  & (df.n == 4)].giou.item()
        assert by_n[4][f"best_of_n/{sel}/giou"] == pytest.approx(want)
        assert f"long/prefix/{sel}/ciou" in by_n[4]
    logged = {k for row in run.history for k in row}
    assert {"metrics_table", "plots/iou_vs_n", "plots/ciou_vs_n", "overlays/00_a",
            "samples", "charts/best_of_n/giou_vs_n_table"} <= logged  # custom chart data
    samples = next(row["samples"] for row in run.history if "samples" in row)
    assert samples["count"] == 2 and samples["_type"] == "images/separated"

    files = logger.run_dir / "files"
    tables = list((files / "media" / "table").glob("metrics_table_*.table.json"))
    table = next(row["metrics_table"] for row in run.history if "metrics_table" in row)
    assert len(tables) == 1 and table["nrows"] == len(df) and table["_type"] == "table-file"
    assert len(list((files / "media" / "images").rglob("*.png"))) >= 5
    assert len(list((files / "media" / "images" / "mask").rglob("*.png"))) >= 2
    assert set(logger.timings) == {"import_s", "init_s", "finish_s"}


def test_two_runs_in_one_process_each_get_their_own_directory(wandb_env: Path) -> None:
    dirs = []
    for k in range(2):
        logger = WandbLogger(dir=wandb_env / f"job{k}", group="sweep")
        logger.start({"k": k}, name=f"job{k}")
        logger.log_summary({"giou@max": 0.1 * k, "skipped": float("nan")})
        logger.finish()
        dirs.append(logger.run_dir)
    runs = [read_run(d) for d in dirs]
    assert [r.config["k"] for r in runs] == [0, 1]
    assert runs[1].summary["giou@max"] == pytest.approx(0.1)
    assert "skipped" not in runs[1].summary and runs[0].run_id != runs[1].run_id


def test_disabled_mode_logs_nothing_and_raises_nothing(wandb_env: Path) -> None:
    df = metrics_frame()
    items = [overlay_item()]
    paths = write_report(wandb_env / "r", [], df, items)
    logger = WandbLogger(mode="disabled", dir=wandb_env / "r")
    logger.start({"a": 1}, name="x", simulated=True)
    log_report(logger, paths, df, items)
    logger.finish()
    assert logger.errors == [] and logger.run_dir is None
    assert not (wandb_env / "r" / "wandb").exists()


def test_simulated_summary_tags_the_run(wandb_env: Path) -> None:
    logger = WandbLogger(dir=wandb_env)
    logger.start({}, name="x")
    logger.log_summary({"simulated": True})
    logger.finish()
    assert "simulated" in read_run(logger.run_dir).tags


def _fake_wandb(monkeypatch: pytest.MonkeyPatch, init: object) -> None:
    fake = types.ModuleType("wandb")
    fake.Settings = lambda **kw: kw  # type: ignore[attr-defined]
    fake.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)


def test_a_failing_wandb_init_never_crashes_the_run(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def init(**kwargs: object) -> None:
        raise ConnectionError("api.wandb.ai unreachable")

    _fake_wandb(monkeypatch, init)
    logger = WandbLogger(mode="online")
    with caplog.at_level(logging.WARNING):
        logger.start({"a": 1}, name="x")
        logger.log_metrics(metrics_frame())
        logger.log_summary({"giou@max": 0.5})
        logger.finish()
    assert logger.errors == ["start: ConnectionError: api.wandb.ai unreachable"]
    assert "W&B start failed" in caplog.text and "the run goes on" in caplog.text


def test_a_failing_log_call_is_a_warning_and_finish_still_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    finished = []

    class Run:
        id, dir, tags = "r1", "/nonexistent/offline-run-x/files", ()

        def define_metric(self, *a: object, **k: object) -> None:
            return None

        def log(self, data: dict) -> None:
            raise RuntimeError("disk full")

        def finish(self) -> None:
            finished.append(True)

    _fake_wandb(monkeypatch, lambda **kw: Run())
    logger = WandbLogger(mode="offline")
    logger.start({}, name="x")
    logger.log_images({"p": Path(__file__)})
    logger.log_metrics(pd.DataFrame({"estimator": [], "selector": [], "n": [], "giou": [],
                                     "ciou": []}))
    logger.finish()
    assert finished == [True]
    assert [e.split(":")[0] for e in logger.errors] == ["log_images", "log_metrics"]


def test_offline_reader_rejects_a_non_wandb_file(tmp_path: Path) -> None:
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a log")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        list(raw_records(bad))
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "missing_dir")


def test_a_multirun_job_is_grouped_by_its_sweep_and_names_the_swept_keys(tmp_path: Path) -> None:
    sweep = tmp_path / "multiruns" / "demo" / "2026-01-02_03-04-05"
    sweep.mkdir(parents=True)
    # what Hydra's sweeper writes before the jobs start: the sweep's own command line
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - dataset.num_samples=4\n"
        "    - verifier.noise=0.1,0.5\n    - verifier=simulated,qwen3vl_8b_instruct\n"
        "    - logger.group=ignored_as_an_axis\n")
    job = {"sweep_dir": str(sweep), "job_num": 3, "choices": {"verifier": "simulated",
                                                              "hydra/launcher": "basic"},
           "overrides": ["dataset.num_samples=4", "verifier.noise=0.5", "verifier=simulated"]}
    ctx = study_context(job)
    assert ctx.multirun and ctx.group == "demo/2026-01-02_03-04-05" and ctx.job_num == 3
    assert ctx.swept == ("verifier.noise", "verifier")  # not the constant override
    assert ctx.choices == {"verifier": "simulated"}
    assert study_context(job, group="mine").group == "mine"
    (sweep / "multirun.yaml").unlink()  # another sweeper: every overridden key is an axis
    assert study_context(job).swept == ("dataset.num_samples", "verifier.noise", "verifier")

    single = study_context({"sweep_dir": str(sweep), "job_num": None,
                            "overrides": ["+x=1", "paths.cache_dir=/c", "~y"]})
    assert not single.multirun and single.group is None and single.swept == ("x",)

    config = {"verifier": {"noise": 0.5, "_target_": "V"}, "max_n": 8}
    assert config_column(config, "verifier.noise") == "verifier.noise"
    assert config_column(config, "verifier") == "study.choices.verifier"
    assert config_column(config, "max_n") == "max_n"


def test_summary_keys_are_flat_and_the_same_for_any_max_n() -> None:
    df = metrics_frame(subsets=("all", "long"))
    keys = summary_keys(df)
    assert keys["giou@16/verifier"] == keys["giou@max/verifier"]
    assert keys["oracle@2"] == pytest.approx(
        df[(df.subset == "all") & (df.estimator == "best_of_n") & (df.selector == "oracle")
           & (df.n == 2)].giou.item())
    assert not [k for k in keys if "long" in k or "prefix" in k]
    small = summary_keys(df[df.n <= 4])
    assert set(k for k in small if "@max" in k) == set(k for k in keys if "@max" in k)

    flat = flat_summary({"gain@max": 0.2, "failure_share": {"plan": 0.1, "verify": None},
                         "cost": {"calls": {"plan": 3}}, "skip": float("nan"), "primary": "v"})
    assert flat == {"gain@max": 0.2, "gain": 0.2, "failure_share/plan": 0.1,
                    "cost/calls/plan": 3, "primary": "v"}


def test_metrics_with_costs_log_quality_against_compute_charts(wandb_env: Path) -> None:
    df = metrics_frame(subsets=("all",))
    df["total_tokens"] = 100.0 * df["n"]  # what the cost columns (issue 12) carry
    df["verify_tokens"] = 60.0 * df["n"]
    logger = WandbLogger(project="rescue-test", dir=wandb_env / "run")
    logger.start({"max_n": 16}, name="cost-run")
    logger.log_metrics(df)
    logger.finish()
    assert logger.errors == []
    logged = {k for row in read_run(logger.run_dir).history for k in row}
    assert {"charts/best_of_n/giou_vs_total_tokens_table",
            "charts/best_of_n/giou_vs_verify_tokens_table"} <= logged
