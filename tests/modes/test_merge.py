"""merge_runs: shards of one study join into one records.jsonl; anything else is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rescue import records
from rescue.datasets.subset import select_ids
from rescue.modes.merge import MergeError, merge_runs
from rescue.modes.merge import find_shards as find_runs
from rescue.records import CandidateRecord, SampleRecord

IDS = [f"img{i:02d}#0" for i in range(10)]


def _cfg(shard: int, num_shards: int, **over) -> dict:
    cfg = {
        "mode": "run", "seed": 0, "max_n": 4, "n_grid": [1, 2, 4],
        "subset": {"fraction": None, "limit": None, "shard": shard, "num_shards": num_shards,
                   "seed": 0},
        "dataset": {"_target_": "x.Data", "split": "val", "root": f"/mnt/node{shard}/data"},
        "planner": {"_target_": "x.Planner", "model": "qwen", "temperature": 0.7,
                    "base_url": f"http://node{shard}:8002/v1"},
        "executor": {"_target_": "x.Exec", "url": "http://localhost:8001"},
        "verifier": {"_target_": "x.Verifier", "model": "qwen-thinking"},
        "paths": {"output_dir": f"/out/{shard}"},
    }
    for k, v in over.items():
        cur = cfg
        *head, last = k.split(".")
        for h in head:
            cur = cur[h]
        cur[last] = v
    return cfg


def _rec(sid: str) -> SampleRecord:
    return SampleRecord(sample_id=sid, dataset="d", query="q", height=2, width=2, target_area=1,
                        simulated=True, candidates=[CandidateRecord(index=0, intersection=1,
                                                                    union=2, iou=0.5)])


def _run(root: Path, name: str, cfg: dict, ids: list[str] | None) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), d / ".hydra" / "config.yaml")
    if ids is not None:
        records.write(d / "records.jsonl", [_rec(i) for i in ids])
    return d


def _shards(root: Path, k: int, **over) -> list[Path]:
    return [_run(root, str(s), _cfg(s, k, **over), select_ids(IDS, shard=s, num_shards=k))
            for s in range(k)]


def test_merge_gives_the_whole_selection(tmp_path: Path) -> None:
    runs = _shards(tmp_path / "sweep", 3)
    merged = merge_runs(runs[::-1], tmp_path / "merged")
    assert [r.sample_id for r in merged] == sorted(IDS)
    assert [r.sample_id for r in records.read(tmp_path / "merged" / "records.jsonl")] == sorted(IDS)
    assert merged[0] == _rec(sorted(IDS)[0])
    # data roots and endpoints may differ per node; they do not make another study
    assert find_runs(tmp_path / "sweep") == runs


@pytest.mark.parametrize(("over", "match"), [
    ({"max_n": 8}, r"max_n: 4 vs 8"),
    ({"planner.temperature": 1.0}, r"planner\.temperature: 0\.7 vs 1\.0"),
    ({"dataset.split": "test"}, r"dataset\.split"),
    ({"subset.fraction": 0.5}, r"subset\.fraction"),
    ({"seed": 3}, r"seed: 0 vs 3"),
])
def test_shards_of_another_study_are_refused(tmp_path: Path, over: dict, match: str) -> None:
    runs = _shards(tmp_path / "a", 2)
    odd = _run(tmp_path, "odd", _cfg(1, 2, **over), select_ids(IDS, shard=1, num_shards=2))
    with pytest.raises(MergeError, match=match):
        merge_runs([runs[0], odd], tmp_path / "m")


def test_missing_duplicate_and_overlapping_shards(tmp_path: Path) -> None:
    runs = _shards(tmp_path / "s", 3)
    with pytest.raises(MergeError, match=r"shards \[1\] of 3 are missing"):
        merge_runs([runs[0], runs[2]], tmp_path / "m")
    again = _run(tmp_path, "again", _cfg(2, 3), select_ids(IDS, shard=2, num_shards=3))
    with pytest.raises(MergeError, match="shard 2 appears twice"):
        merge_runs([*runs, again], tmp_path / "m")
    other_k = _shards(tmp_path / "k2", 2)
    with pytest.raises(MergeError, match=r"subset\.num_shards: 3 vs 2"):
        merge_runs([*runs, *other_k], tmp_path / "m")
    overlap = _run(tmp_path, "ov", _cfg(1, 3), [*select_ids(IDS, shard=1, num_shards=3), IDS[0]])
    with pytest.raises(MergeError, match=r"sample 'img00#0' is in shard 0 and shard 1"):
        merge_runs([runs[0], overlap, runs[2]], tmp_path / "m")
    unfinished = _run(tmp_path, "unf", _cfg(1, 3), None)
    with pytest.raises(MergeError, match=r"shard 1 .* has no records\.jsonl"):
        merge_runs([runs[0], unfinished, runs[2]], tmp_path / "m")
    with pytest.raises(MergeError, match="not a Hydra run directory"):
        merge_runs([tmp_path], tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="no Hydra run directories below"):
        find_runs(tmp_path / "empty")
    with pytest.raises(MergeError, match="neither a run nor a multirun directory"):
        find_runs(tmp_path / "nowhere")


def test_find_runs_skips_merge_runs_and_the_output(tmp_path: Path) -> None:
    runs = _shards(tmp_path / "sweep", 2)
    _run(tmp_path / "sweep", "merge_out", _cfg(0, 2, mode="merge"), None)
    out = _run(tmp_path / "sweep", "zz_self", _cfg(0, 1), None)
    assert find_runs([tmp_path / "sweep"], exclude=out) == runs
