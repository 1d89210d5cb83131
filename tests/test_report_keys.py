"""`report.*` does what conf/config.yaml says: each key flipped, in every mode that reports.

The demo is composed as `python run.py` composes it and run in process; the files it writes
(or does not) are the effect. A new `report` key fails `test_every_report_key_is_tested` until
it has a row in EFFECTS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from rescue.modes import evaluate as evaluate_mode
from rescue.modes import merge as merge_mode
from rescue.modes import run as run_mode

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dataset.num_samples=4", "max_n=4", "n_grid=[1,2,4]", "selection.bootstrap=10",
         "logger=none", "pipeline.progress=false"]
PLOTS = {"iou_vs_n.png", "ciou_vs_n.png", "iou_vs_n_prefix.png", "quality_vs_cost.png"}


def _config(tmp_path: Path, out: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[*SMALL, *overrides])
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / out)
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def _pngs(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("*.png")}


def _sheets(run_dir: Path) -> list[str] | None:
    """The overlay sheets, None where there is no overlays/ folder."""
    d = run_dir / "overlays"
    return sorted(p.name for p in d.glob("*.png")) if d.is_dir() else None


EFFECTS = {"plot", "overlays"}
"""The keys of `report`, each checked below."""


def test_every_report_key_is_tested(tmp_path):
    assert set(_config(tmp_path, "x").report) == EFFECTS


def test_report_plot_and_overlays_in_mode_run(tmp_path):
    on = tmp_path / "on"
    run_mode.run(_config(tmp_path, "on", "report.plot=true", "report.overlays=2"))
    assert _pngs(on) == PLOTS and len(_sheets(on)) == 2
    off = tmp_path / "off"
    run_mode.run(_config(tmp_path, "off", "report.plot=false", "report.overlays=0"))
    assert _pngs(off) == set() and _sheets(off) is None
    assert (off / "metrics.csv").is_file() and (off / "summary.json").is_file()
    # each key alone: plots without sheets, sheets without plots
    run_mode.run(_config(tmp_path, "plots", "report.plot=true", "report.overlays=0"))
    assert _pngs(tmp_path / "plots") == PLOTS and _sheets(tmp_path / "plots") is None
    run_mode.run(_config(tmp_path, "sheets", "report.plot=false", "report.overlays=1"))
    assert _pngs(tmp_path / "sheets") == set() and len(_sheets(tmp_path / "sheets")) == 1


@pytest.mark.parametrize("plot", [True, False])
def test_report_plot_in_mode_evaluate_and_merge(tmp_path, plot):
    """The source ran with the other setting: the command's own `report.plot` decides."""
    src = tmp_path / "src"
    cfg = _config(tmp_path, "src", f"report.plot={not plot}", "report.overlays=0")
    run_mode.run(cfg)
    (src / ".hydra").mkdir()  # what Hydra saves, and merge reads the shard's settings from
    (src / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert bool(_pngs(src)) is (not plot)
    evaluate_mode.reevaluate(_config(tmp_path, "ev", "mode=evaluate", f"records_from={src}",
                                     f"report.plot={plot}"))
    ev = tmp_path / "ev"
    assert (_pngs(ev) == PLOTS) is plot and (not _pngs(ev)) is (not plot)
    assert _sheets(ev) is None  # evaluate has records, not images: no empty overlays/
    merge_mode.main(_config(tmp_path, "merged", "mode=merge", f"records_from=[{src}]",
                            f"report.plot={plot}"))
    merged = tmp_path / "merged"
    assert (merged / "metrics.csv").is_file()
    assert (_pngs(merged) == PLOTS) is plot and (not _pngs(merged)) is (not plot)
