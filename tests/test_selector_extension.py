"""A new selector is one definition: it then reaches metrics.csv, the plot and analysis.rescore.

`TOY` below is the whole of it; the test registers it as `rescue/selection.py` would (one more
entry in `SELECTORS`), names it in the config, and edits nothing else.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from analysis import rescore
from analysis.runs import load_run
from rescue import selection
from rescue.modes import run as run_mode
from rescue.reporting.plots import iou_vs_n_figure
from rescue.selection import Selector

ROOT = Path(__file__).resolve().parents[1]
CI = ["subset", "estimator", "n", "giou", "ciou", "giou_lo", "giou_hi", "ciou_lo", "ciou_hi"]

TOY = Selector("toy", lambda candidates, *, key, seed: np.array(
    [float(c.area) if c.ok else -np.inf for c in candidates]))
"""The largest mask wins."""


def _config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "dataset.num_samples=5", "max_n=4", "n_grid=[1,2,4]", "selection.bootstrap=20",
            "report.overlays=0", "logger=none", "pipeline.progress=false", *overrides])
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def test_a_toy_selector_is_one_definition(tmp_path, monkeypatch):
    monkeypatch.setattr(selection, "SELECTORS",
                        selection.registry(*selection.SELECTORS.values(), TOY))
    result = run_mode.run(_config(tmp_path, "selection.selectors=[verifier,toy,oracle]"))
    run_dir = tmp_path / "run"

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics.selector) == {"verifier", "toy", "oracle"}
    toy = metrics[metrics.selector == "toy"]
    assert set(toy.n) == {1, 2, 4} and set(toy.estimator) == {"best_of_n", "prefix"}
    # evaluated like any other: never above the upper bound
    at = toy.set_index(["subset", "estimator", "n"]).giou
    oracle = metrics[metrics.selector == "oracle"].set_index(["subset", "estimator", "n"]).giou
    assert (at <= oracle + 1e-12).all()

    assert (run_dir / "iou_vs_n.png").is_file()
    fig = iou_vs_n_figure(metrics, selectors=result["settings"].selectors)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["verifier", "toy", "oracle (upper bound)"]

    assert rescore.parse_weights("toy=1,verifier=0.5") == {"toy": 1.0, "verifier": 0.5}
    paths = rescore.rescore_run(run_dir, {"toy": 1.0}, name="t1", out_dir=tmp_path / "re")
    table = pd.read_csv(paths["csv"])
    assert {"toy", "t1"} <= set(table.selector)
    pd.testing.assert_frame_equal(
        table[table.selector == "t1"][CI].reset_index(drop=True),
        toy[CI].reset_index(drop=True), check_exact=True)
    assert load_run(run_dir).evaluation_settings().selectors == (
        selection.VERIFIER, TOY, selection.ORACLE)
