"""Cost accounting through the pipeline: stats.json totals equal the sum over the cache entries,
records carry each call once (on the first member of a dedupe group), a cached rerun spends
nothing and reports the same totals."""

import asyncio
import json

from rescue.cache import STAGES, Cache
from rescue.cost import Cost, total
from rescue.datasets.synthetic import SyntheticDataset
from rescue.models.simulated import SimulatedExecutor, SimulatedPlanner, SimulatedVerifier
from rescue.pipeline import Pipeline


def _cache_totals(root) -> dict[str, Cost]:
    out = {}
    for stage in STAGES:
        costs = []
        for seg in sorted((root / stage).glob("*.jsonl")):
            for line in seg.read_text().splitlines():
                costs.append(Cost.of(json.loads(line)["v"].get("meta")))
        out[stage] = total(costs)
    return out


def _run(tmp_path, max_n=12):
    ds = SyntheticDataset(num_samples=4, seed=2, height=96, width=128)
    # a coarse planner repeats itself: duplicate prompts and duplicate masks to dedupe
    planner = SimulatedPlanner(box_jitter=0.0, p_point=0.0, p_invalid=0.2)
    pipe = Pipeline(planner, SimulatedExecutor(noise=0.0), SimulatedVerifier(),
                    Cache(tmp_path / "cache"), max_n=max_n, progress=False)
    recs = asyncio.run(pipe.run(ds, ds.sample_ids()))
    return pipe, recs


def test_stats_totals_equal_the_cache_entries_and_the_records_count_each_call_once(tmp_path):
    pipe, recs = _run(tmp_path)
    assert pipe.stats.deduped["execute"] > 0 and pipe.stats.deduped["verify"] > 0
    in_cache = _cache_totals(tmp_path / "cache")
    for stage in STAGES:
        assert pipe.stats.cost[stage] == in_cache[stage] == pipe.stats.spent[stage]
        in_records = total([Cost.from_json(c.cost.get(stage)) for r in recs
                            for c in r.candidates])
        assert in_records == in_cache[stage], stage  # deduped calls counted once, in the group
    assert in_cache["plan"].calls == len(recs)  # one request per sample (n = max_n)
    assert in_cache["execute"].prompts == pipe.stats.items["execute"]
    assert in_cache["verify"].calls == pipe.stats.items["verify"]
    assert all(c.simulated for c in in_cache.values())
    dumped = pipe.stats.to_json()
    assert Cost.from_json(dumped["cost"]["verify"]) == in_cache["verify"]


def test_a_cached_rerun_spends_nothing_and_reports_the_same_totals(tmp_path):
    first, recs = _run(tmp_path)
    again, recs2 = _run(tmp_path)
    assert again.stats.model_calls == 0
    assert again.stats.spent == {}
    assert again.stats.cost == first.stats.cost
    assert [r.to_json() for r in recs2] == [r.to_json() for r in recs]
