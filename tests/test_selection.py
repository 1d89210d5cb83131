"""Selectors: scores per candidate, failure handling, registry."""

import numpy as np
import pytest

from rescue import selection
from rescue.records import CandidateRecord


def _pool() -> list[CandidateRecord]:
    return [
        CandidateRecord(index=0, verifier_score=0.4, executor_score=0.9, consensus=0.5, iou=0.3),
        CandidateRecord(index=1, failed_stage="execute", error="TimeoutError: slow"),
        CandidateRecord(index=2, verifier_score=0.8, executor_score=None, consensus=0.7, iou=0.9),
        CandidateRecord(index=3, duplicate_of=2, executor_score=0.2, consensus=0.7, iou=0.9),
        CandidateRecord(index=4, failed_stage="verify", error="HTTP 500", executor_score=0.1,
                        consensus=None, iou=0.1),
        CandidateRecord(index=5, failed_stage="plan", error="invalid JSON"),
    ]


def test_registry_holds_the_six_default_selectors_the_arena_and_the_policies():
    assert list(selection.SELECTORS) == ["verifier", "executor", "consensus", "first", "random",
                                         "oracle", "arena", "listwise", "prefilter",
                                         "early_exit", "until_confident"]
    assert [s.name for s in selection.DEFAULTS] == list(selection.SELECTORS)[:6]


def test_unknown_selector_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown selector 'verfier'.*verifier, executor"):
        selection.get("verfier")


@pytest.mark.parametrize("name", list(selection.SELECTORS))
def test_failed_candidates_score_minus_inf_and_working_ones_beat_them(name):
    s = selection.get(name).scores(_pool(), key="a", seed=0)
    assert s.shape == (6,)
    assert s[1] == -np.inf and s[5] == -np.inf
    assert np.all(s[[0, 2, 3, 4]] > -np.inf)


def test_verifier_reads_scores_inherits_duplicates_and_ranks_unscored_last():
    s = selection.get("verifier").scores(_pool())
    assert s[0] == 0.4 and s[2] == 0.8
    assert s[3] == 0.8  # duplicate of 2, verified once
    assert s[4] == selection.UNSCORED and s[4] < s[0]


def test_executor_scores():
    s = selection.get("executor").scores(_pool())
    assert list(s[[0, 3, 4]]) == [0.9, 0.2, 0.1]
    assert s[2] == selection.UNSCORED  # 2 has no executor score; 3 has its own


def test_consensus_and_oracle_and_first():
    c = selection.get("consensus").scores(_pool())
    assert list(c[[0, 2, 3, 4]]) == [0.5, 0.7, 0.7, 0.0]
    o = selection.get("oracle").scores(_pool())
    assert list(o[[0, 2, 3, 4]]) == [0.3, 0.9, 0.9, 0.1]
    f = selection.get("first").scores(_pool())
    assert list(f[[0, 2, 3, 4]]) == [0.0, -2.0, -3.0, -4.0]


def test_random_ties_every_working_candidate_and_picks_by_seed():
    pool = [CandidateRecord(index=k) for k in range(32)] + [CandidateRecord(
        index=32, failed_stage="plan")]
    a = selection.get("random").scores(pool, key="s1", seed=0)
    assert set(a[:32]) == {0.0} and a[32] == -np.inf
    picks = {selection.get("random").select(pool, key=f"s{k}", seed=0) for k in range(40)}
    assert len(picks) > 10 and 32 not in picks
    random = selection.get("random")
    assert random.select(pool, key="s1", seed=0) == random.select(pool, key="s1", seed=0)


def test_select_gives_the_single_answer():
    assert selection.get("verifier").select(_pool()) == 2  # tie 2/3 goes to the earlier one
    assert selection.get("executor").select(_pool()) == 0
    assert selection.get("first").select(_pool()) == 0
    assert selection.get("oracle").select([]) is None
    failed = [CandidateRecord(index=0, failed_stage="execute", error="x")]
    assert selection.get("verifier").select(failed) is None
    # a failed verification keeps the mask: it is still an answer, below any verified one
    unverified = [CandidateRecord(index=0, failed_stage="verify", error="x"),
                  CandidateRecord(index=1, failed_stage="plan", error="x")]
    assert selection.get("verifier").select(unverified) == 0
    unverified.append(CandidateRecord(index=2, verifier_score=0.01))
    assert selection.get("verifier").select(unverified) == 2
