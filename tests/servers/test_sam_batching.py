"""The batching rule both SAM3 backends share (no torch): groups, chunks, order, fallback."""

from __future__ import annotations

import pytest

from servers.backends.batching import chunks, run_batched


def test_chunks_group_by_key_in_order_of_first_appearance_and_cut_at_max_batch() -> None:
    items = ["a1", "b1", "a2", "a3", "b2", "a4", "c1"]
    assert chunks(items, lambda s: s[0], 3) == [[0, 2, 3], [5], [1, 4], [6]]
    assert chunks(items, lambda s: s[0], 1) == [[i] for i in (0, 2, 3, 5, 1, 4, 6)]
    with pytest.raises(ValueError):
        chunks(items, lambda s: s[0], 0)


def test_results_come_back_in_the_items_order_with_one_call_per_chunk() -> None:
    calls: list[list[str]] = []

    def batch(group: list[str]) -> list[str]:
        calls.append(group)
        return [s.upper() for s in group]

    items = ["a1", "b1", "a2", "b2", "a3"]
    out = run_batched(items, lambda s: s[0], 2, batch, lambda s: f"alone {s}")
    assert out == ["A1", "B1", "A2", "B2", "alone a3"]  # a chunk of one runs alone
    assert calls == [["a1", "a2"], ["b1", "b2"]]


def test_a_failing_batch_runs_its_items_alone_and_out_of_memory_raises() -> None:
    def batch(group: list[str]) -> list[str]:
        if "bad" in group:
            raise ValueError("one bad item")
        return [s.upper() for s in group]

    def one(s: str) -> str:
        return "failed" if s == "bad" else s.upper()

    assert run_batched(["x", "bad", "y"], lambda s: 0, 8, batch, one) == ["X", "failed", "Y"]
    # a batch that answers too few is as good as a failed one
    assert run_batched(["x", "y"], lambda s: 0, 8, lambda g: g[:1], one) == ["X", "Y"]

    def oom(group: list[str]) -> list[str]:
        raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_batched(["x", "y"], lambda s: 0, 8, oom, one)
