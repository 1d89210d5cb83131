"""The cache: keys, torn lines, several writers, offline misses."""

import hashlib
import json
import multiprocessing as mp

import pytest

from rescue.cache import Cache, CacheMiss, Canonical, make_key


def test_key_is_canonical_and_sensitive():
    a = make_key({"model": {"name": "q", "t": 0.7}, "index": 3})
    assert a == make_key({"index": 3, "model": {"t": 0.7, "name": "q"}})
    assert a != make_key({"index": 4, "model": {"name": "q", "t": 0.7}})
    assert a != make_key({"index": 3, "model": {"name": "q", "t": 0.8}})


def _value(rng, depth=0):
    kinds = ["int", "float", "str", "bool", "none", "path"] + (["list", "dict"] if depth < 3
                                                               else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-10**20, 10**20)
    if kind == "float":
        return rng.choice([0.1, 1e16, -2.5e-7, 0.7, float(rng.random())])
    if kind == "str":
        return "".join(rng.choice("aZ é\"\\\n😀{},:") for _ in range(rng.randint(0, 6)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "path":  # not JSON: keys take its str
        import pathlib
        return pathlib.Path("/tmp/x")
    if kind == "list":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{rng.randint(0, 9)}é": _value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def test_a_canonical_part_gives_the_key_of_its_value():
    import random
    rng = random.Random(0)
    for _ in range(500):
        fields = {f"f{rng.randint(0, 20)}": _value(rng) for _ in range(rng.randint(1, 5))}
        plain = make_key(fields)
        assert plain == hashlib.sha256(json.dumps(
            fields, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
        for name in fields:
            assert make_key({**fields, name: Canonical.of(fields[name])}) == plain
    with pytest.raises(TypeError, match="named by strings"):
        make_key({1: "x"})


def test_put_get_roundtrip_across_instances(tmp_path):
    c = Cache(tmp_path)
    c.put("plan", "k1", {"raw": "x", "n": 1}, "sample 1")
    assert c.get("plan", "k1") == {"raw": "x", "n": 1}
    fresh = Cache(tmp_path)
    assert fresh.get("plan", "k1") == {"raw": "x", "n": 1}
    assert fresh.get("plan", "nope") is None
    assert fresh.stats() == {"plan.hit": 1, "plan.miss": 1}


def test_torn_last_line_is_skipped_and_others_survive(tmp_path):
    c = Cache(tmp_path)
    for i in range(3):
        c.put("execute", f"k{i}", {"i": i})
    seg = next((tmp_path / "execute").glob("*.jsonl"))
    with open(seg, "a") as f:
        f.write('{"k": "k9", "v": {"i": 9')  # a writer killed mid-line
    fresh = Cache(tmp_path)
    assert [fresh.get("execute", f"k{i}") for i in range(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert fresh.get("execute", "k9") is None


def test_garbage_line_in_the_middle_is_skipped(tmp_path):
    (tmp_path / "verify").mkdir()
    (tmp_path / "verify" / "w.jsonl").write_text(
        json.dumps({"k": "a", "v": 1}) + "\nnot json\n" + json.dumps({"k": "b", "v": 2}) + "\n")
    c = Cache(tmp_path)
    assert (c.get("verify", "a"), c.get("verify", "b")) == (1, 2)


def test_offline_miss_names_what_is_missing(tmp_path):
    c = Cache(tmp_path, offline=True)
    with pytest.raises(CacheMiss, match="hypothesis 7 of sample 'img3'"):
        c.require("plan", "abc", "hypothesis 7 of sample 'img3'")
    with pytest.raises(RuntimeError, match="read-only"):
        c.put("plan", "abc", {})


def test_sees_entries_written_by_another_instance_meanwhile(tmp_path):
    reader = Cache(tmp_path, rescan_interval=0.0)
    assert reader.get("plan", "late") is None
    Cache(tmp_path).put("plan", "late", {"v": 1})
    assert reader.get("plan", "late") == {"v": 1}


def _writer(root, worker, n):
    c = Cache(root)
    for i in range(n):
        c.put("execute", f"w{worker}-{i}", {"worker": worker, "i": i, "pad": "x" * 200})


def test_several_processes_share_one_directory(tmp_path):
    procs = [mp.get_context("spawn").Process(target=_writer, args=(str(tmp_path), w, 200))
             for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = Cache(tmp_path)
    for w in range(4):
        for i in range(200):
            assert c.get("execute", f"w{w}-{i}") == {"worker": w, "i": i, "pad": "x" * 200}
    assert len(list((tmp_path / "execute").glob("*.jsonl"))) == 4


def _child_writes(cache, key):
    cache.put("plan", key, {"by": "child"})


def test_a_forked_child_writes_its_own_segment_not_its_parents_open_one(tmp_path):
    c = Cache(tmp_path)
    c.put("plan", "parent-0", {"by": "parent"})  # the parent's files are open now
    child = mp.get_context("fork").Process(target=_child_writes, args=(c, "child-0"))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    c.put("plan", "parent-1", {"by": "parent"})
    assert len(list((tmp_path / "plan").glob("*.jsonl"))) == 2
    fresh = Cache(tmp_path)
    assert [fresh.get("plan", k) for k in ("parent-0", "child-0", "parent-1")] == \
        [{"by": "parent"}, {"by": "child"}, {"by": "parent"}]
    c.close()
    c.put("plan", "parent-2", {"by": "parent"})  # closed files reopen on the next write
    assert Cache(tmp_path).get("plan", "parent-2") == {"by": "parent"}


def _racer(root, start, keys, out):
    """A non-deterministic writer: a fresh random answer for every key, the same keys as the
    other racers, all released at once."""
    import os

    c = Cache(root, rescan_interval=1e9)
    len(c)  # index now, before the others write: lookups would miss what they store
    start.wait()
    out.put({k: c.put("plan", k, {"answer": os.urandom(8).hex()}) for k in keys})


def test_the_first_answer_wins_for_every_writer_and_every_reader(tmp_path):
    ctx = mp.get_context("spawn")
    keys = [make_key({"i": i}) for i in range(40)]
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), start, keys, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    kept = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(k == kept[0] for k in kept[1:])  # each writer goes on with the same answers
    reader = Cache(tmp_path)
    assert {k: reader.get("plan", k) for k in keys} == kept[0]
    lines = [json.loads(line) for seg in (tmp_path / "plan").glob("*.jsonl")
             for line in seg.read_text().splitlines()]
    assert sorted(entry["k"] for entry in lines) == sorted(keys)  # no key stored twice


def test_put_returns_the_stored_answer_and_a_late_writer_gets_the_first(tmp_path):
    early, late = Cache(tmp_path), Cache(tmp_path, rescan_interval=1e9)
    assert len(late) == 0
    assert early.put("plan", "k", {"v": 1}) == {"v": 1}
    assert late.put("plan", "k", {"v": 2}) == {"v": 1}
    assert late.get("plan", "k") == {"v": 1} and Cache(tmp_path).get("plan", "k") == {"v": 1}
    assert late.stats() == {"plan.hit": 1, "plan.lost": 1}


def test_put_many_appends_one_requests_answers_at_once(tmp_path, monkeypatch):
    from rescue import cache as cache_mod

    early, late = Cache(tmp_path), Cache(tmp_path, rescan_interval=1e9)
    assert len(late) == 0
    early.put("plan", "k1", {"v": "early"})
    writes: list[bytes] = []
    real = cache_mod._append
    monkeypatch.setattr(cache_mod, "_append", lambda fd, data: (writes.append(data),
                                                                real(fd, data)))
    got = late.put_many("plan", [("k0", {"v": 0}, "a"), ("k1", {"v": 1}, "b"),
                                 ("k2", {"v": 2}, "c"), ("k0", {"v": 9}, "a again")])
    assert got == [{"v": 0}, {"v": "early"}, {"v": 2}, {"v": 0}]
    assert len(writes) == 2  # the segment's lines, then their claims: one append each
    assert writes[0].count(b"\n") == 2 and writes[1].count(b"\n") == 2
    fresh = Cache(tmp_path)
    assert [fresh.get("plan", k) for k in ("k0", "k1", "k2")] == [{"v": 0}, {"v": "early"},
                                                                   {"v": 2}]
    assert late.stats() == {"plan.lost": 1, "plan.write": 2}


def test_memory_holds_an_index_and_values_are_read_back_from_disk(tmp_path):
    c = Cache(tmp_path)
    c.put("verify", "k" * 64, {"reasoning": "long " * 1000})
    fresh = Cache(tmp_path)
    assert fresh.get("verify", "k" * 64) == {"reasoning": "long " * 1000}
    (where,) = fresh._stages["verify"].entries.values()
    assert isinstance(where, tuple) and where[2] > 5000  # (segment, offset, length)


def test_a_corrupt_value_behind_a_valid_key_reads_as_a_miss(tmp_path):
    (tmp_path / "plan").mkdir()
    key = "a" * 64
    (tmp_path / "plan" / "w.jsonl").write_text('{"k":"' + key + '","v":{"x": tru\n'
                                               + json.dumps({"k": "b", "v": 2}) + "\n")
    c = Cache(tmp_path)
    assert c.get("plan", key) is None and c.get("plan", "b") == 2
    assert c.stats() == {"plan.hit": 1, "plan.miss": 1}


def test_own_writes_are_not_rescanned(tmp_path):
    c = Cache(tmp_path, rescan_interval=0.0)
    for i in range(3):
        c.put("plan", f"k{i}", i)
    own = f"{c.writer}.jsonl"
    assert c._stages["plan"].offsets[own] == (tmp_path / "plan" / own).stat().st_size
    assert c.get("plan", "missing") is None
    assert [c.get("plan", f"k{i}") for i in range(3)] == [0, 1, 2]


def test_the_first_answer_for_a_key_wins_for_every_reader(tmp_path):
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "a-writer.jsonl").write_text(json.dumps({"k": "k", "v": 1}) + "\n")
    reader = Cache(tmp_path, rescan_interval=0.0)
    assert reader.get("plan", "k") == 1
    (tmp_path / "plan" / "b-writer.jsonl").write_text(json.dumps({"k": "k", "v": 2}) + "\n")
    assert reader.get("plan", "missing") is None  # a rescan reads b-writer's segment
    assert reader.get("plan", "k") == 1 and Cache(tmp_path).get("plan", "k") == 1


def test_a_write_reads_the_claims_log_not_every_segment(tmp_path, monkeypatch):
    for w in range(20):  # twenty other jobs' segments
        Cache(tmp_path).put("plan", f"other-{w}", {"w": w})
    c = Cache(tmp_path)
    assert len(c) == 20
    scans = []
    monkeypatch.setattr(Cache, "_scan", lambda self, stage: scans.append(stage))
    for i in range(50):
        assert c.put("plan", f"new-{i}", {"i": i}) == {"i": i}
    assert scans == []  # the segments were indexed once, when the cache was opened
    assert c.put("plan", "other-3", {"w": "late"}) == {"w": 3}  # the claim names the winner


def test_a_writers_own_claims_are_known_without_reading_them_back(tmp_path, monkeypatch):
    a, b = Cache(tmp_path), Cache(tmp_path)
    parsed: list[int] = []
    real = Cache._claims

    def counting(self, fd, seg):
        before = seg.claims_offset
        out = real(self, fd, seg)
        parsed.append(seg.claims_offset - before)
        return out

    monkeypatch.setattr(Cache, "_claims", counting)
    for i in range(3):
        a.put("plan", f"a{i}", i)
    assert parsed == [0, 0, 0]  # a's own claims were never read back
    b.put("plan", "b0", "b")  # another writer's claim in between ...
    assert a.put("plan", "b0", "late") == "b"  # ... is read: its answer wins
    assert parsed[-1] > 0 and len(a._stages["plan"].claims) == 4
    assert a.put("plan", "a1", "again") == 1  # and a's own claims still name its answers
    claims_log = (tmp_path / "plan" / "claims").read_bytes()
    assert a._stages["plan"].claims_offset == len(claims_log)


def test_a_torn_claims_tail_does_not_swallow_the_next_writers_first_claim(tmp_path):
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "claims").write_bytes(b"deadbeef host-1.jsonl 0")  # a crash's tail
    late = Cache(tmp_path, rescan_interval=1e9)
    assert len(late) == 0  # indexed now: it learns of k1 from the claims log only
    early = Cache(tmp_path)
    early.put("plan", "k1", "early")
    assert early._stages["plan"].claims_offset == 0  # not its own log's end: read it back
    assert late.put("plan", "k1", "late") == "early"  # k1's claim survived the torn line
    assert Cache(tmp_path).get("plan", "k1") == "early"


def test_a_claim_another_host_appended_meanwhile_is_read_back(tmp_path, monkeypatch):
    """A flock that locks one host only (NFS local_lock) does not keep another host's claims
    out between a writer's read of the log and its own append: the log's size tells."""
    from rescue import cache as cache_mod

    c = Cache(tmp_path)
    c.put("plan", "k0", 0)
    foreign = b"f" * 64 + b" other-host.jsonl 0 10\n"
    real = cache_mod._append

    def racing(fd, data):
        if data.endswith(b"\n") and b".jsonl " in data:  # the claims append
            real(fd, foreign)
        real(fd, data)

    monkeypatch.setattr(cache_mod, "_append", racing)
    c.put("plan", "k1", 1)
    monkeypatch.setattr(cache_mod, "_append", real)
    log = (tmp_path / "plan" / "claims").read_bytes()
    seg = c._stages["plan"]
    assert seg.claims_offset < len(log) and "f" * 64 not in seg.claims
    c.put("plan", "k2", 2)
    assert "f" * 64 in seg.claims
    assert seg.claims_offset == len((tmp_path / "plan" / "claims").read_bytes())


def test_without_flock_a_writer_reads_its_own_claims_back(tmp_path, monkeypatch):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    c = Cache(tmp_path)
    c.put("plan", "k0", 0)
    c.put("plan", "k1", 1)  # unlocked, another writer may have appended: the log is re-read
    log = (tmp_path / "plan" / "claims").read_bytes()
    assert c._stages["plan"].claims_offset == log.index(b"\n") + 1 < len(log)
    assert set(c._stages["plan"].claims) == {"k0"}  # k1's claim is read at the next write


def test_a_file_system_without_flock_still_takes_writes(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    c = Cache(tmp_path)
    for i in range(3):
        assert c.put("verify", f"k{i}", {"i": i}) == {"i": i}
    assert Cache(tmp_path).get("verify", "k2") == {"i": 2}
    assert sum("refuses flock" in r.message for r in caplog.records) == 1  # warned once


def test_values_orjson_cannot_write_are_stored_and_read_back(tmp_path):
    odd = {"text": "a lone \ud800 surrogate", "big": 2**70, "plain": "é 😀", "x": [1.5, None]}
    Cache(tmp_path).put_many("verify", [("k" * 64, odd, "odd"), ("j" * 64, {"t": "é"}, "é")])
    fresh = Cache(tmp_path)
    assert fresh.get("verify", "k" * 64) == odd
    assert fresh.get("verify", "j" * 64) == {"t": "é"}
    seg = next((tmp_path / "verify").glob("*.jsonl")).read_bytes()
    assert "é".encode() in seg and b"\\ud800" in seg  # UTF-8 where it can, escaped where not


def test_a_prompts_canonical_json_spliced_into_a_key_gives_the_key_of_its_json():
    from rescue.hypothesis import Prompt

    for p in (Prompt(text="A  Red Car"), Prompt(box=(1.234, 2, 3.5, 4.25)),
              Prompt(points=((1, 2.005), (3, 4)), point_labels=(1, 0)),
              Prompt(text="é ü \u2028", box=(0, 0, 1e-7, 1e17))):
        assert make_key({"prompt": Canonical(p.canonical_json), "q": "x"}) == make_key(
            {"prompt": p.to_json(), "q": "x"}), p
