"""Subsetting: deterministic, stable under dataset growth, shards partition the selection."""

from __future__ import annotations

import pytest

from rescue.datasets.subset import select_ids, shard_bounds

IDS = [f"s{i:05d}" for i in range(5000)]


def test_fraction_is_deterministic_and_close_to_target() -> None:
    a = select_ids(IDS, fraction=0.1, seed=3)
    assert a == select_ids(list(IDS), fraction=0.1, seed=3)
    assert 400 <= len(a) <= 600  # binomial(5000, 0.1): mean 500, sd 21
    assert a != select_ids(IDS, fraction=0.1, seed=4)
    assert a == [i for i in IDS if i in set(a)]  # dataset order kept


def test_fraction_stable_when_dataset_grows() -> None:
    old = IDS[:3000]
    grown = IDS[:1000] + [f"new{i}" for i in range(700)] + IDS[1000:] + ["zz"]
    before = set(select_ids(old, fraction=0.25, seed=7))
    after = set(select_ids(grown, fraction=0.25, seed=7))
    assert after & set(old) == before
    assert select_ids(old[::-1], fraction=0.25, seed=7) == sorted(before, reverse=True)


def test_fractions_nest() -> None:
    small = set(select_ids(IDS, fraction=0.1, seed=0))
    large = set(select_ids(IDS, fraction=0.3, seed=0))
    assert small < large
    assert select_ids(IDS, fraction=1.0) == IDS


def test_limit_takes_first_in_order_after_fraction() -> None:
    sel = select_ids(IDS, fraction=0.5, seed=1)
    assert select_ids(IDS, fraction=0.5, seed=1, limit=17) == sel[:17]
    assert select_ids(IDS, limit=0) == []
    assert select_ids(IDS[:3], limit=10) == IDS[:3]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 100, 101])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_shards_partition_the_selection(n: int, k: int) -> None:
    ids = IDS[:n]
    full = select_ids(ids, limit=None)
    parts = [select_ids(ids, shard=s, num_shards=k) for s in range(k)]
    assert [x for p in parts for x in p] == full  # contiguous, in order, no overlap, no gap
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(shard_bounds(n, s, k)[1] - shard_bounds(n, s, k)[0] for s in range(k)) == n


def test_shards_of_a_fraction_with_limit() -> None:
    kw = {"fraction": 0.2, "seed": 5, "limit": 333}
    full = select_ids(IDS, **kw)
    parts = [select_ids(IDS, shard=s, num_shards=4, **kw) for s in range(4)]
    assert [x for p in parts for x in p] == full and len(full) == 333


@pytest.mark.parametrize("kw", [{"fraction": 0.0}, {"fraction": 1.5}, {"limit": -1},
                                {"num_shards": 0}, {"shard": 2, "num_shards": 2},
                                {"shard": -1}])
def test_bad_arguments(kw: dict) -> None:
    with pytest.raises(ValueError, match="subset"):
        select_ids(IDS, **kw)


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        select_ids(["a", "b", "a"])


def test_a_run_says_which_part_of_the_split_it_evaluates():
    from rescue.modes.run import subset_description

    assert subset_description({"fraction": None, "limit": None, "num_shards": 1}) == \
        "the whole split"
    assert subset_description({"fraction": 0.1, "limit": 20, "shard": 1, "num_shards": 4}) == \
        "subset.fraction=0.1, subset.limit=20, shard 1 of 4"
