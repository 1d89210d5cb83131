"""The dataset and launcher configs compose with real Hydra and build loaders from $RESCUE_DATA."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from dataset_fixtures import noise_image, rect_points, write_jpg, write_json
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rescue.datasets.base import DatasetError
from rescue.datasets.reasonseg import ReasonSegDataset
from rescue.datasets.refcoco import RefCocoDataset

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


def _build(node):
    """Instantiate as the app does; Hydra wraps the loader's DatasetError (the cause)."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        raise e.__cause__ from None


def _dataset_cfg(option: str, extra: list[str] | None = None):
    cfg = _compose([f"dataset={option}", *(extra or [])])
    return OmegaConf.create(OmegaConf.to_container(cfg.dataset, resolve=True))


@pytest.mark.parametrize(("option", "dataset", "split_by", "root"), [
    ("refcoco", "refcoco", "unc", "refcoco"), ("refcocoplus", "refcoco+", "unc", "refcocoplus"),
    ("refcocog", "refcocog", "umd", "refcocog")])
def test_refcoco_configs_follow_rescue_data(option, dataset, split_by, root, tmp_path,
                                            monkeypatch) -> None:
    monkeypatch.setenv("RESCUE_DATA", str(tmp_path))
    node = _dataset_cfg(option)
    assert (node.dataset, node.split_by, node.split) == (dataset, split_by, "val")
    assert node.root == str(tmp_path / root)
    assert node.coco_dir == str(tmp_path / "coco" / "train2014")
    with pytest.raises(DatasetError, match=rf"{root}.*RESCUE_DATA"):
        _build(node)  # the folder is not there yet: the error names it and the variable
    (tmp_path / root).mkdir()
    with pytest.raises(DatasetError, match="no parquet files"):
        _build(node)


def test_reasonseg_config_builds_the_loader(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RESCUE_DATA", str(tmp_path))
    val = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    write_jpg(val / "x.jpg", noise_image(8, 8, 0))
    write_json(val / "x.json", {"text": ["q"], "is_sentence": False,
                                "shapes": [{"label": "target", "points": rect_points(1, 1, 2, 2),
                                            "shape_type": "polygon"}]})
    ds = _build(_dataset_cfg("reasonseg", ["dataset.queries=all"]))
    assert isinstance(ds, ReasonSegDataset)
    assert ds.sample_ids() == ["x#0"] and ds.load("x#0").gt.sum() == 4
    with pytest.raises(DatasetError, match="valid splits: train, val, test"):
        _build(_dataset_cfg("reasonseg", ["dataset.split=testA"]))


def test_refcoco_config_with_data(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RESCUE_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="valid splits: train, val, testA, testB"):
        _build(_dataset_cfg("refcoco", ["dataset.split=test"]))
    assert RefCocoDataset  # the target named in the YAML
    assert _dataset_cfg("refcoco")._target_ == "rescue.datasets.refcoco.RefCocoDataset"


@pytest.mark.parametrize("option", ["refcoco", "refcocoplus", "refcocog"])
def test_refcoco_parts_default_to_lisa_and_switch_to_union(option, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RESCUE_DATA", str(tmp_path))
    assert _dataset_cfg(option).parts == "lisa"
    assert _dataset_cfg(option, ["dataset.parts=union"]).parts == "union"
    (tmp_path / _dataset_cfg(option).root.rsplit("/", 1)[-1]).mkdir()
    with pytest.raises(DatasetError, match=r"parts must be one of \('lisa', 'union'\)"):
        _build(_dataset_cfg(option, ["dataset.parts=sum"]))


@pytest.mark.parametrize(("option", "target", "fields"), [
    ("slurm", "SlurmLauncher", {"gpus_per_node": 0, "cpus_per_task": 4, "timeout_min": 240,
                                "mem_gb": 16, "array_parallelism": 64, "partition": None}),
    ("local", "LocalLauncher", {"cpus_per_task": 2, "timeout_min": 120}),
    ("joblib_shards", "JoblibLauncher", {"n_jobs": 4, "prefer": "processes"}),
])
def test_launcher_presets(option, target, fields) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated schema matching
        cfg = _compose([f"hydra/launcher={option}", "hydra.launcher.timeout_min=30"]
                       if option != "joblib_shards" else [f"hydra/launcher={option}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(target)
    for k, v in fields.items():
        if k == "timeout_min":
            v = 30
        assert launcher[k] == v, k
