"""Every config composes and every experiment instantiates (lightning-hydra-template's pattern)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf, open_dict

from rescue.settings import EvaluationSettings

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = ["dataset", "planner", "executor", "verifier", "selection", "logger", "layout"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def _resolve(cfg) -> None:
    for key in cfg:
        if key != "hydra":
            value = cfg[key]
            if OmegaConf.is_config(value):
                OmegaConf.to_container(value, resolve=True)


def test_default_is_the_demo(tmp_path):
    cfg = _compose([], tmp_path)
    assert cfg.task_name == "demo" and cfg.mode == "run"
    assert cfg.dataset._target_.endswith("SyntheticDataset")
    assert cfg.planner._target_.endswith("SimulatedPlanner")
    assert EvaluationSettings.from_config(cfg).n_grid[-1] == cfg.max_n


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group, tmp_path):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"], tmp_path)
        _resolve(cfg)  # every interpolation resolves
        node = cfg[group]
        if "_target_" in node:
            assert callable(get_object(node._target_)), node._target_


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_instantiates(experiment, tmp_path, monkeypatch):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_"), "experiments only override"
    cfg = _compose([f"experiment={experiment}"], tmp_path)
    _resolve(cfg)
    assert EvaluationSettings.from_config(cfg).n_grid  # the N grid fits max_n
    for role in ("planner", "executor", "verifier"):
        model = instantiate(cfg[role])
        assert isinstance(dict(model.identity()), dict)
        assert isinstance(model.simulated, bool)
    instantiate(cfg.logger)
    assert callable(get_object(cfg.dataset._target_))
