"""Reporting: tables, failure counts, summary, plots, overlay sheets, the one-call report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from reporting_fakes import (
    NS,
    SELECTORS,
    candidate_masks,
    make_sample,
    metrics_frame,
    overlay_item,
    sample_record,
)

from rescue import selection
from rescue.records import CandidateRecord, SampleRecord, reason_code
from rescue.reporting import (
    NullLogger,
    OverlayItem,
    draw_candidates,
    failure_table,
    log_report,
    plot_iou_vs_n,
    summary,
    write_metrics,
    write_overlays,
    write_report,
)
from rescue.reporting.overlays import SELECTED_RGB, shown_candidates
from rescue.reporting.plots import Bands, iou_vs_n_figure, line_colors
from rescue.reporting.tables import metrics_markdown

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- tables


def test_write_metrics_csv_round_trips_and_markdown_lists_everything(tmp_path: Path) -> None:
    df = metrics_frame()
    paths = write_metrics(df, tmp_path, simulated=False)
    back = pd.read_csv(paths["metrics_csv"])
    assert list(back.columns) == [*df.columns, "simulated"] and not back.simulated.any()
    pd.testing.assert_frame_equal(back.drop(columns="simulated"), df, check_dtype=False)
    md = paths["metrics_md"].read_text()
    for sel in SELECTORS:
        assert f" {sel} " in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for n in NS:
        assert any(line.startswith(f"| {n} |") for line in rows)
    # 2 estimators x 2 metrics, each a header row + one row per N
    assert len(rows) == 4 * (1 + len(NS))
    assert md.index("## best_of_n") < md.index("## prefix")
    assert "E[ΣI] / E[ΣU]" in md
    assert "SIMULATED" not in md


def test_markdown_cells_are_percent_with_interval_and_bold_best_non_oracle() -> None:
    df = metrics_frame()
    md = metrics_markdown(df, simulated=True)
    assert "SIMULATED models" in md and "not a model" in md
    row = df[(df.estimator == "best_of_n") & (df.selector == "verifier") & (df.n == 4)].iloc[0]
    cell = f"{100 * row.giou:.1f} [{100 * row.giou_lo:.1f}, {100 * row.giou_hi:.1f}]"
    assert cell in md
    # random has the highest non-oracle score in the fake frame; oracle is never bold
    best = df[(df.estimator == "best_of_n") & (df.selector == "random") & (df.n == 16)].iloc[0]
    assert f"**{100 * best.giou:.1f} [" in md
    oracle = df[(df.estimator == "best_of_n") & (df.selector == "oracle") & (df.n == 16)].iloc[0]
    assert f"**{100 * oracle.giou:.1f}" not in md


def test_markdown_bolds_nothing_when_every_selector_ties() -> None:
    df = metrics_frame()
    df.loc[df.n == 1, ["giou", "giou_lo", "giou_hi"]] = [0.5, 0.4, 0.6]
    df.loc[(df.n == 2) & df.selector.isin(["verifier", "consensus"]), "giou"] = 0.9
    rows = [line for line in metrics_markdown(df).splitlines() if line.startswith("| ")]
    giou_rows = rows[1:1 + len(NS)]  # best_of_n gIoU table, after its header row
    assert giou_rows[0].startswith("| 1 |") and "**" not in giou_rows[0]
    assert giou_rows[1].count("**90.0") == 2


def test_markdown_has_a_section_per_subset_all_first() -> None:
    md = metrics_markdown(metrics_frame(subsets=("long", "all", "short")))
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:2] == ["## best_of_n", "## prefix"]
    assert "## best_of_n — subset `long`" in heads and "## prefix — subset `short`" in heads
    assert len(heads) == 6


def test_metrics_without_required_columns_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        metrics_markdown(metrics_frame().drop(columns="ciou"))


@pytest.mark.parametrize(("error", "code"), [
    ("parse:no_json: the model said hi", "parse:no_json"),
    ("TimeoutError: after 30 s", "TimeoutError"),
    ("execute:grabcut_failed error: cv2.error: bad", "execute:grabcut_failed"),
    ("box:out_of_image [1, 2] outside 0..10", "box:out_of_image"),
    ("request:ConnectError: refused", "request:ConnectError"),
    ("no colon here", "no colon here"),
    (None, "unknown"),
    ("", "unknown"),
])
def test_reason_code(error: str | None, code: str) -> None:
    assert reason_code(error) == code


def _failing_records() -> list[SampleRecord]:
    def rec(sid: str, cands: list[CandidateRecord], error: str | None = None) -> SampleRecord:
        return SampleRecord(sample_id=sid, dataset="d", query="q", height=4, width=4,
                            target_area=3, simulated=True, candidates=cands, error=error)

    ok = CandidateRecord
    return [
        rec("a", [ok(0), ok(1, "plan", "parse:no_json: x"), ok(2, "plan", "parse:no_json: y"),
                  ok(3, "execute", "grabcut failed: boom")]),
        rec("b", [ok(0, "plan", "parse:no_json: z"), ok(1, "verify", "TimeoutError: 30 s"),
                  ok(2), ok(3)]),
        rec("c", [], error="SampleError: corrupt image"),
    ]


def test_failure_table_counts_by_stage_and_reason(tmp_path: Path) -> None:
    table = failure_table(_failing_records())
    got = {(r.stage, r.reason): (r.count, r.samples) for r in table.itertuples()}
    assert got == {("plan", "parse:no_json"): (3, 2), ("execute", "grabcut failed"): (1, 1),
                   ("verify", "TimeoutError"): (1, 1), ("sample", "SampleError"): (1, 1)}
    assert table.iloc[0].reason == "parse:no_json"  # most frequent first
    assert table.iloc[0].fraction == pytest.approx(3 / 8)
    assert table.iloc[0].example == "parse:no_json: x"
    paths = write_report(tmp_path, _failing_records(), metrics_frame())
    back = pd.read_csv(paths["failures_csv"])
    assert back["count"].sum() == 6 and list(back.columns) == [*table.columns, "simulated"]


def test_failure_table_of_clean_records_is_empty_with_columns() -> None:
    s = make_sample()
    rec = sample_record(s)
    rec.candidates = [c for c in rec.candidates if c.ok]
    table = failure_table([rec])
    assert table.empty and "reason" in table.columns


def test_summary_headline_numbers() -> None:
    df = metrics_frame(subsets=("all", "long"))
    s = summary(df, primary="verifier")
    pick = df[(df.subset == "all") & (df.estimator == "best_of_n")].set_index(["selector", "n"])
    assert s["max_n"] == 16 and s["num_samples"] == 40 and s["primary"] == "verifier"
    assert s["giou@1"] == pytest.approx(pick.loc[("verifier", 1), "giou"])
    assert s["giou@16"] == s["giou@max"] == pytest.approx(pick.loc[("verifier", 16), "giou"])
    assert s["ciou@max"] == pytest.approx(pick.loc[("verifier", 16), "ciou"])
    assert s["oracle/giou@max"] == pytest.approx(pick.loc[("oracle", 16), "giou"])
    assert s["gain@max"] == pytest.approx(s["giou@max"] - s["giou@1"])
    prefix = df[(df.subset == "all") & (df.estimator == "prefix")].set_index(["selector", "n"])
    assert s["prefix/giou@max"] == pytest.approx(prefix.loc[("verifier", 16), "giou"])
    assert summary(df, primary="oracle")["giou@max"] == s["oracle/giou@max"]
    with pytest.raises(ValueError, match="primary selector 'nope'"):
        summary(df, primary="nope")


# ---------------------------------------------------------------- plots


def _red_title_pixels(path: Path) -> int:
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    top = arr[: arr.shape[0] // 20]  # the suptitle's band, above any line
    return int(((top[..., 0] > 150) & (top[..., 1] < 60) & (top[..., 2] < 80)).sum())


def test_plot_iou_vs_n_writes_a_png_and_marks_simulated(tmp_path: Path) -> None:
    df = metrics_frame()
    real = plot_iou_vs_n(df, tmp_path / "real.png", "giou")
    sim = plot_iou_vs_n(df, tmp_path / "sim.png", "giou", simulated=True)
    ciou = plot_iou_vs_n(df, tmp_path / "sub" / "ciou.png", "ciou", estimator="prefix")
    for p in (real, sim, ciou):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (900, 576)
    assert _red_title_pixels(sim) > 200 and _red_title_pixels(real) == 0
    with pytest.raises(ValueError, match="no metrics rows"):
        plot_iou_vs_n(df, tmp_path / "x.png", estimator="nope")
    with pytest.raises(ValueError, match="metric must be"):
        plot_iou_vs_n(df, tmp_path / "x.png", metric="dice")


def test_plot_handles_one_n_and_missing_intervals(tmp_path: Path) -> None:
    df = metrics_frame()
    df = df[df.n == 1].assign(giou_lo=np.nan, giou_hi=np.nan)
    path = plot_iou_vs_n(df, tmp_path / "one.png")
    assert path.stat().st_size > 5_000


def _shaded(ax) -> list[str]:
    """The colours of the bands on `ax` (fill_between), as hex."""
    from matplotlib.colors import to_hex
    return [to_hex(c.get_facecolor()[0]) for c in ax.collections]


def test_plot_states_the_level_and_shades_only_the_primary_and_the_oracle() -> None:
    df = metrics_frame()
    fig = iou_vs_n_figure(df, bands=Bands(0.9, 200, "verifier"))
    ax = fig.axes[0]
    assert ax.get_legend().get_title().get_text() == (
        "shaded: 90% bootstrap CI over samples (200 resamples)")
    assert _shaded(ax) == [selection.VERIFIER.color, selection.ORACLE.color]
    assert all(c.get_facecolor()[0][3] <= 0.1 for c in ax.collections)  # light
    # the level recorded by the evaluation (frame attrs); another primary shades its line
    df.attrs.update(ci=0.8, bootstrap=10, primary="consensus")
    ax = iou_vs_n_figure(df).axes[0]
    assert "80% bootstrap CI over samples (10 resamples)" in ax.get_legend().get_title().get_text()
    assert _shaded(ax) == [selection.CONSENSUS.color, selection.ORACLE.color]
    # no level known (a metrics.csv read back) or no resamples: no band, and it says so
    bare = iou_vs_n_figure(metrics_frame()).axes[0]
    assert not bare.collections and "not known" in bare.get_legend().get_title().get_text()
    none = iou_vs_n_figure(metrics_frame(), bands=Bands(0.95, 0, "verifier")).axes[0]
    assert not none.collections and "bootstrap=0" in none.get_legend().get_title().get_text()


def test_the_report_plots_say_the_level_the_config_set(tmp_path: Path, monkeypatch) -> None:
    from rescue.evaluation import evaluate
    from rescue.reporting import plots
    from rescue.settings import EvaluationSettings

    drawn = {}
    monkeypatch.setattr(plots, "save_png", lambda fig, out, simulated=False: drawn.setdefault(
        Path(out).name, fig) and Path(out))
    cfg = OmegaConf.create({"max_n": 4, "n_grid": [1, 2, 4],
                            "selection": {"ci": 0.8, "bootstrap": 30, "primary": "consensus"}})
    settings = EvaluationSettings.from_config(cfg)
    recs = [sample_record(make_sample(f"s{i}")) for i in range(3)]
    write_report(tmp_path, recs, evaluate(recs, settings), simulated=True,
                 primary=settings.primary.name, selectors=settings.selectors)
    ax = drawn["iou_vs_n.png"].axes[0]
    assert ax.get_legend().get_title().get_text() == (
        "shaded: 80% bootstrap CI over samples (30 resamples)")
    assert _shaded(ax) == [selection.CONSENSUS.color, selection.ORACLE.color]


def test_selectors_the_palette_does_not_know_get_colours_of_their_own() -> None:
    df = metrics_frame()
    df["selector"] = df["selector"].replace({"first": "new_a", "random": "new_b"})
    ax = iou_vs_n_figure(df, bands=Bands(0.95, 10, "verifier")).axes[0]
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert colors["verifier"] == selection.VERIFIER.color
    assert len(set(colors.values())) == len(colors)  # no two lines alike
    defined = {s.color for s in selection.SELECTORS.values()}
    assert colors["new_a"] not in defined and colors["new_b"] not in defined
    # deterministic: the same table draws the same colours
    again = iou_vs_n_figure(df, bands=Bands(0.95, 10, "verifier")).axes[0]
    assert {line.get_label(): line.get_color() for line in again.get_lines()} == colors
    # a selector defined without a colour is given one too, never the verifier's
    toy = selection.Selector("toy", selection.VERIFIER.score)
    picked = line_colors(["verifier", "toy"], {"verifier": selection.VERIFIER, "toy": toy})
    assert picked["toy"] not in defined


# ---------------------------------------------------------------- overlays


def test_shown_candidates_ranks_dedupes_and_keeps_the_selection() -> None:
    s = make_sample()
    rec = sample_record(s)
    shown = shown_candidates(rec, selected=2, max_candidates=8)
    # failed #3 dropped, duplicate #6 folded into #0 (2 copies), ordered by verifier score
    assert [x.candidate.index for x in shown] == [0, 2, 1, 5, 4]
    assert shown[0].copies == 2 and [x.selected for x in shown] == [0, 1, 0, 0, 0]
    top2 = shown_candidates(rec, selected=4, max_candidates=2)
    assert [x.candidate.index for x in top2] == [0, 4] and top2[1].selected
    # selecting a duplicate marks the mask it duplicates
    assert shown_candidates(rec, selected=6)[0].selected


def test_draw_candidates_contact_sheet(tmp_path: Path) -> None:
    item = overlay_item(selected=2)
    sheet = draw_candidates(item.sample, item.record, item.masks, item.selected)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    # 2 + 5 distinct candidates -> 5 columns x 2 rows of 300-px-wide tiles
    assert 1500 <= sheet.shape[1] <= 1600 and 2 * 169 < sheet.shape[0] < 2 * 169 + 300
    frame = np.all(sheet == np.array(SELECTED_RGB, np.uint8), axis=-1).sum()
    assert frame > 1000  # the selected tile's frame
    unselected = draw_candidates(item.sample, item.record, item.masks, None)
    assert np.all(unselected == np.array(SELECTED_RGB, np.uint8), axis=-1).sum() < frame / 10


def test_draw_candidates_survives_missing_masks_and_empty_pools() -> None:
    s = make_sample()
    rec = sample_record(s)
    sheet = draw_candidates(s, rec, {}, selected=0)
    assert sheet.shape[0] > 100
    failed = SampleRecord(sample_id="x", dataset="d", query="q", height=s.height,
                          width=s.width, target_area=0, simulated=False, candidates=[],
                          error="SampleError: corrupt")
    only_two = draw_candidates(s, failed, {}, None)
    assert only_two.shape[1] < 700  # image and ground truth only


class BrokenMasks(dict):
    def get(self, key, default=None):
        raise OSError("cache segment unreadable")


def test_write_overlays_skips_a_broken_item(tmp_path: Path) -> None:
    good = overlay_item("a/b c")
    s = make_sample("bad")
    bad = OverlayItem(sample=s, record=sample_record(s), masks=BrokenMasks(), selected=0)
    paths = write_overlays([good, bad, overlay_item("z")], tmp_path / "ov")
    assert [p.name for p in paths] == ["00_a_b_c.png", "02_z.png"]
    with Image.open(paths[0]) as im:
        assert im.mode == "RGB" and im.width > 1000


def test_a_mask_of_the_wrong_shape_is_not_drawn(caplog: pytest.LogCaptureFixture) -> None:
    item = overlay_item()
    masks = dict(item.masks)
    masks[2] = masks[2][:10]
    masks[1] = "not a mask"
    sheet = draw_candidates(item.sample, item.record, masks, selected=2)
    assert sheet.shape == draw_candidates(item.sample, item.record, item.masks, 2).shape
    assert "#2: mask shape (10, 160) != image (90, 160)" in caplog.text
    assert "#1: mask shape ()" in caplog.text


def test_tall_images_get_captions_room_and_long_queries_wrap() -> None:
    s = make_sample("tall", height=400, width=120)
    rec = sample_record(s)
    rec.query = "the thing " * 60
    sheet = draw_candidates(s, rec, candidate_masks(s), selected=None)
    short = draw_candidates(s, sample_record(s), candidate_masks(s), selected=None)
    assert sheet.shape[1] >= 5 * 250
    assert 2 * 26 <= sheet.shape[0] - short.shape[0] <= 2 * 26 + 5  # capped at 3 lines


def test_selected_index_picks_the_best_score() -> None:
    # the sheets mark the selector's own single answer (`Selector.answer`)
    def selected_index(rec, selector="verifier"):
        return selection.get(selector).answer(rec)

    rec = sample_record(make_sample())
    assert selected_index(rec, "verifier") == 0
    assert selected_index(rec, "executor") == 6
    assert selected_index(rec, "oracle") in (0, 6)
    assert selected_index(rec, "first") == 0
    rec.candidates = [c for c in rec.candidates if not c.ok]
    assert selected_index(rec) is None


# ---------------------------------------------------------------- the report


def test_write_report_produces_every_file(tmp_path: Path) -> None:
    s = make_sample()
    items = [overlay_item("one"), overlay_item("two", selected=None)]
    records = [sample_record(s), *_failing_records()]
    paths = write_report(tmp_path, records, metrics_frame(), items, simulated=True,
                         primary="verifier")
    for name in ("metrics.csv", "metrics.md", "failures.csv", "iou_vs_n.png", "ciou_vs_n.png",
                 "summary.json", "overlays/00_one.png", "overlays/01_two.png"):
        assert (tmp_path / name).is_file(), name
    assert paths["iou_vs_n"] == tmp_path / "iou_vs_n.png"
    assert paths["overlays/00_one"] == tmp_path / "overlays" / "00_one.png"
    head = json.loads(paths["summary"].read_text())
    assert head["simulated"] is True and "not a model" in head["note"]
    assert head["num_records"] == 4 and head["num_candidates"] == 15
    assert head["failed_by_stage"] == {"plan": 4, "execute": 1, "verify": 1}
    assert head["giou@max"] == pytest.approx(summary(metrics_frame())["giou@max"])
    assert "report_errors" not in head


def test_write_report_keeps_going_when_a_plot_cannot_be_drawn(tmp_path: Path) -> None:
    df = metrics_frame()
    prefix_only = df[df.estimator == "prefix"]
    paths = write_report(tmp_path, [], prefix_only, [], simulated=False)
    assert paths["metrics_csv"].is_file() and paths["failures_csv"].is_file()
    head = json.loads(paths["summary"].read_text())
    assert any(e.startswith("plots:") for e in head["report_errors"])
    assert any(e.startswith("summary:") for e in head["report_errors"])
    assert not (tmp_path / "iou_vs_n.png").exists()


class RecordingLogger(NullLogger):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def log_metrics(self, metrics: pd.DataFrame) -> None:
        self.calls.append(("metrics", len(metrics)))

    def log_images(self, images: dict[str, Path]) -> None:
        self.calls.append(("images", sorted(images)))

    def log_overlays(self, items: list[OverlayItem]) -> None:
        self.calls.append(("overlays", len(items)))

    def log_summary(self, summary: dict) -> None:
        self.calls.append(("summary", summary["giou@max"]))


def test_log_report_sends_every_part(tmp_path: Path) -> None:
    df = metrics_frame()
    items = [overlay_item()]
    paths = write_report(tmp_path, [], df, items)
    logger = RecordingLogger()
    log_report(logger, paths, df, items)
    calls = dict(logger.calls)
    assert calls["metrics"] == len(df) and calls["overlays"] == 1
    assert calls["images"] == ["overlays/00_s0", "plots/ciou_vs_n", "plots/iou_vs_n",
                               "plots/iou_vs_n_prefix"]
    assert calls["summary"] == pytest.approx(summary(df)["giou@max"])


def test_logger_configs_instantiate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rescue.reporting.logger import Logger
    from rescue.reporting.wandb_logger import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, cls in (("none", NullLogger), ("wandb", WandbLogger)):
        yaml = OmegaConf.load(ROOT / "conf" / "logger" / f"{name}.yaml")
        cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "logger": yaml})
        logger = instantiate(cfg.logger)
        assert isinstance(logger, cls) and isinstance(logger, Logger)
    assert logger.mode == "offline" and logger.dir == tmp_path and logger.project == "rescue"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert instantiate(cfg.logger).mode == "disabled"


def test_candidate_masks_fixture_matches_records() -> None:
    # guards the fixtures themselves: IoU of #0 is 1 and of #1 is 0
    s = make_sample()
    rec = sample_record(s)
    assert rec.candidates[0].iou == 1.0 and rec.candidates[1].iou == 0.0
    assert set(candidate_masks(s)) == {0, 1, 2, 4, 5}
