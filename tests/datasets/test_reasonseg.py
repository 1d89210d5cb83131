"""ReasonSeg loaders against fixtures in LISA's release layout and the parquet copies' layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from dataset_fixtures import (
    box_truth,
    noise_image,
    png_bytes,
    rect_points,
    write_jpg,
    write_json,
    write_png,
)

from rescue.datasets.base import Dataset, DatasetError, SampleError
from rescue.datasets.reasonseg import EXPECTED_IMAGES, ReasonSegDataset
from rescue.sample import IGNORE

H, W = 24, 32


def shape(label: str, pts: list[list[float]]) -> dict:
    return {"label": label, "points": pts, "group_id": None, "shape_type": "polygon", "flags": {}}


def anno(texts: list[str], is_sentence: bool, shapes: list[dict]) -> dict:
    return {"text": texts, "is_sentence": is_sentence, "shapes": shapes,
            "imageHeight": H, "imageWidth": W}


@pytest.fixture
def lisa_root(tmp_path: Path) -> Path:
    """val/ with: an ignore hole in a target and a flag shape; two target parts with float
    coordinates; a small target inside a larger ignore region; a corrupt image; a JSON without
    its image (no sample: LISA globs *.jpg); a malformed shape; a cp1252-encoded JSON; an image
    without its JSON; a .png and a .JPG pair and a hidden .jpg (none of them samples)."""
    root = tmp_path / "ReasonSeg"
    val = root / "val"
    write_jpg(val / "a.jpg", noise_image(H, W, 1))
    write_json(val / "a.json", anno(["the striped thing", " what you sit on "], False, [
        shape("flag", rect_points(0, 0, W - 1, H - 1)),
        shape("target", rect_points(2, 3, 20, 15)),
        shape("ignore", rect_points(5, 5, 8, 9)),
    ]))
    write_jpg(val / "b.jpg", noise_image(H, W, 2))
    write_json(val / "b.json", anno(["Something you would use to keep the rain off."], True, [
        shape("target", rect_points(1.9, 1.2, 6.7, 4.99)),  # truncates to (1, 1)-(6, 4)
        shape("Target", rect_points(25, 10, 30, 20)),
    ]))
    write_jpg(val / "c.jpg", noise_image(H, W, 3))
    write_json(val / "c.json", anno(["the cup"], False, [
        shape("target", rect_points(10, 10, 12, 12)),
        shape("ignore_region", rect_points(4, 4, 20, 20)),
    ]))
    (val / "d.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    write_json(val / "d.json", anno(["x"], False, [shape("target", rect_points(1, 1, 3, 3))]))
    write_json(val / "e.json", anno(["no image"], False, []))
    write_jpg(val / "f.jpg", noise_image(H, W, 6))
    write_json(val / "f.json", anno(["bad"], False, [{"label": "target", "points": [1, 2, 3]}]))
    write_jpg(val / "g.jpg", noise_image(H, W, 7))
    (val / "g.json").write_bytes(
        '{"text": ["caf\u00e9 table"], "is_sentence": false, "shapes": []}'.encode("cp1252"))
    write_jpg(val / "h.jpg", noise_image(H, W, 8))
    write_png(val / "i.png", noise_image(H, W, 9))
    write_json(val / "i.json", anno(["png"], False, []))
    write_jpg(val / "j.JPG", noise_image(H, W, 10))
    write_json(val / "j.json", anno(["upper case"], False, []))
    write_jpg(val / "._a.jpg", noise_image(H, W, 11))
    (root / "train").mkdir()
    return root


def test_lisa_layout_masks_pixel_by_pixel(lisa_root: Path) -> None:
    ds = ReasonSegDataset(lisa_root, split="val")
    assert isinstance(ds, Dataset)
    assert ds.layout == "lisa"
    assert ds.sample_ids() == ["a", "b", "c", "d", "f", "g", "h"]

    a = ds.load("a")
    truth = box_truth((H, W), (2, 3, 20, 15))
    truth = box_truth((H, W), (5, 5, 8, 9), value=IGNORE, base=truth)
    np.testing.assert_array_equal(a.gt, truth)  # flag skipped, ignore hole kept
    assert a.query == "the striped thing"  # LISA: text[0]
    assert a.tags == ("short",)
    assert a.dataset == "reasonseg_val"
    assert a.target_boxes == ((2.0, 3.0, 21.0, 16.0),)
    expected = cv2.cvtColor(cv2.imread(str(lisa_root / "val" / "a.jpg")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(a.image, expected)

    b = ds.load("b")
    np.testing.assert_array_equal(b.gt, box_truth((H, W), (1, 1, 6, 4), (25, 10, 30, 20)))
    assert b.tags == ("long",)

    c = ds.load("c")  # largest first: the small target stays visible inside the ignore region
    truth = box_truth((H, W), (4, 4, 20, 20), value=IGNORE)
    np.testing.assert_array_equal(c.gt, box_truth((H, W), (10, 10, 12, 12), base=truth))

    g = ds.load("g")
    assert g.query == "caf\u00e9 table"
    assert not g.gt.any()


def test_lisa_bad_samples_raise_sample_error_naming_the_file(lisa_root: Path) -> None:
    ds = ReasonSegDataset(lisa_root, split="val")
    with pytest.raises(SampleError, match=r"^image:corrupt .*d\.jpg: "):
        ds.load("d")
    with pytest.raises(SampleError, match=r"annotation missing or unreadable: .*h\.json"):
        ds.load("h")
    with pytest.raises(SampleError, match="unknown sample id"):
        ds.load("e")  # an orphan JSON is no sample
    with pytest.raises(SampleError, match=r"f\.json: malformed annotation: shapes\[0\]\.points"):
        ds.load("f")
    with pytest.raises(SampleError, match="unknown sample id"):
        ds.load("zzz")
    (lisa_root / "val" / "a.json").write_text("{not json")
    with pytest.raises(SampleError, match=r"a\.json: malformed annotation \(not JSON"):
        ds.load("a")


def test_lisa_all_queries(lisa_root: Path) -> None:
    ds = ReasonSegDataset(lisa_root, split="val", queries="all")
    ids = ds.sample_ids()
    assert ids[:3] == ["a#0", "a#1", "b#0"]
    assert "d#0" in ids and "f#0" in ids and "h#0" in ids and "e#0" not in ids
    s0, s1 = ds.load("a#0"), ds.load("a#1")
    assert (s0.query, s1.query) == ("the striped thing", "what you sit on")
    np.testing.assert_array_equal(s0.gt, s1.gt)


def test_dataset_errors(lisa_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"valid splits: train, val, test"):
        ReasonSegDataset(lisa_root, split="testA")
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=r"nowhere.*RESCUE_DATA"):
        ReasonSegDataset(missing, split="val")
    with pytest.raises(DatasetError, match=r"split 'test' not found.*subfolders here: "
                                           r"\['train', 'val'\]"):
        ReasonSegDataset(lisa_root, split="test")
    with pytest.raises(DatasetError, match="queries must be one of"):
        ReasonSegDataset(lisa_root, split="val", queries="random")


def test_documented_split_sizes() -> None:
    # LISA's release: 1218 images = 239 train + 200 val + 779 test (LISA paper, Sec. 3).
    assert EXPECTED_IMAGES == {"train": 239, "val": 200, "test": 779}
    assert sum(EXPECTED_IMAGES.values()) == 1218


# ------------------------------------------------------------------------------- parquet


def _write_parquet(path: Path, rows: list[dict], mask_as_png: bool = False) -> None:
    import datasets

    feats = {
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "mask": datasets.Image() if mask_as_png else datasets.List(datasets.List(
            datasets.Value("bool"))),
        "image_id": datasets.Value("string"),
        "ann_id": datasets.Value("string"),
        "img_height": datasets.Value("int64"),
        "img_width": datasets.Value("int64"),
    }
    cols = {k: [r[k] for r in rows] for k in feats}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(cols, features=datasets.Features(feats)).to_parquet(str(path))


def _row(image_id: str, image: np.ndarray, mask: np.ndarray, text: str, png: bool) -> dict:
    h, w = mask.shape
    m = {"bytes": png_bytes(np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)),
         "path": None} if png else mask.astype(bool).tolist()
    return {"image": {"bytes": png_bytes(image), "path": None}, "text": text, "mask": m,
            "image_id": image_id, "ann_id": f"{image_id}_0", "img_height": h, "img_width": w}


@pytest.mark.parametrize("mask_as_png", [False, True])
def test_parquet_layout(tmp_path: Path, hf_cache: Path, mask_as_png: bool) -> None:
    root = tmp_path / "ReasonSeg_hf"
    img1, img2 = noise_image(H, W, 11), noise_image(H, W, 12)
    m1 = box_truth((H, W), (3, 4, 9, 12)).astype(bool)
    m2 = box_truth((H, W), (0, 0, 31, 23)).astype(bool)
    m2[5:10, 5:10] = False  # a hole
    rows = [_row("img1", img1, m1, "the lamp", mask_as_png),
            _row("img2", img2, m2, "what keeps you warm?", mask_as_png)]
    _write_parquet(root / "data" / "test-00000-of-00001.parquet", rows, mask_as_png)
    _write_parquet(root / "data" / "val-00000-of-00001.parquet", rows[:1], mask_as_png)

    ds = ReasonSegDataset(root, split="test", cache_dir=hf_cache)
    assert ds.layout == "parquet"
    assert ds.sample_ids() == ["img1", "img2"]
    s2 = ds.load("img2")
    np.testing.assert_array_equal(s2.image, img2)  # PNG: lossless
    np.testing.assert_array_equal(s2.gt, m2.astype(np.uint8))
    assert s2.query == "what keeps you warm?"
    assert s2.tags == ()  # the copies carry no is_sentence
    np.testing.assert_array_equal(ds.load("img1").gt, m1.astype(np.uint8))
    assert ReasonSegDataset(root, split="val", cache_dir=hf_cache).sample_ids() == ["img1"]
    with pytest.raises(DatasetError, match=r"parquet splits found: \['test', 'val'\]"):
        ReasonSegDataset(root, split="train", cache_dir=hf_cache)


def test_parquet_corrupt_image_and_bad_mask(tmp_path: Path, hf_cache: Path) -> None:
    root = tmp_path / "hf"
    good = _row("ok", noise_image(H, W, 1), np.zeros((H, W), bool), "q", False)
    bad_img = dict(good, image_id="bad", image={"bytes": b"garbage", "path": None})
    bad_mask = dict(good, image_id="small", mask=np.zeros((H - 1, W), bool).tolist())
    _write_parquet(root / "val.parquet", [good, bad_img, bad_mask])
    ds = ReasonSegDataset(root, split="val", cache_dir=hf_cache)
    assert ds.sample_ids() == ["ok", "bad", "small"]
    assert ds.load("ok").gt.sum() == 0
    with pytest.raises(SampleError, match=r"^image:unsupported .*bad"):
        ds.load("bad")
    with pytest.raises(SampleError, match=r"mask shape \(23, 32\) != image shape \(24, 32\)"):
        ds.load("small")


def test_png_mask_with_ignore_label(tmp_path: Path) -> None:
    from rescue.datasets.parquet import mask_cell

    m = box_truth((6, 6), (1, 1, 3, 3))
    m[0, 0] = 255
    path = tmp_path / "m.png"
    write_png(path, np.repeat(m[..., None], 3, axis=2))
    got = mask_cell({"bytes": None, "path": str(path)}, "m")
    np.testing.assert_array_equal(got, m)  # 1 present: 255 means ignore
    np.testing.assert_array_equal(mask_cell((m == 1) * 255, "m"), (m == 1).astype(np.uint8))


def test_unforeseen_defect_becomes_a_sample_error(lisa_root: Path, monkeypatch) -> None:
    ds = ReasonSegDataset(lisa_root, split="val")

    def boom(*args: object) -> None:
        raise KeyError("imageData")

    monkeypatch.setattr(ds, "_load_lisa", boom)
    with pytest.raises(SampleError, match=r"reasonseg_val/a: KeyError: 'imageData'"):
        ds.load("a")


def test_failed_samples_keep_the_tags_of_their_readable_annotation(lisa_root: Path) -> None:
    ds = ReasonSegDataset(lisa_root, split="val")
    val = lisa_root / "val"
    write_json(val / "d.json", anno(["x"], True, [shape("target", rect_points(1, 1, 3, 3))]))
    cases = {"d": ("long",),  # corrupt image, readable JSON
             "f": ("short",),  # malformed shape
             "h": ()}  # no JSON: nothing says
    for sid, tags in cases.items():
        with pytest.raises(SampleError) as info:
            ds.load(sid)
        assert info.value.tags == tags == ds.tags_of(sid), sid
    assert ds.tags_of("a") == ds.load("a").tags == ("short",)
    assert ds.tags_of("nope") == ()
    (val / "a.json").write_text("{not json")
    with pytest.raises(SampleError) as info:
        ds.load("a")
    assert info.value.tags == ()


def test_only_the_first_text_must_be_usable(tmp_path: Path) -> None:
    val = tmp_path / "R" / "val"
    write_jpg(val / "a.jpg", noise_image(H, W, 1))
    write_json(val / "a.json", anno(["  the lamp ", "", 7], True, []))
    write_jpg(val / "b.jpg", noise_image(H, W, 2))
    write_json(val / "b.json", anno(["", "second"], True, []))
    ds = ReasonSegDataset(tmp_path / "R", split="val")
    assert ds.load("a").query == "the lamp"  # LISA: text[0], stripped; the rest unread
    with pytest.raises(SampleError, match=r"b\.json: malformed annotation: text #0 is ''"):
        ds.load("b")
    every = ReasonSegDataset(tmp_path / "R", split="val", queries="all")
    assert every.sample_ids() == ["a#0", "a#1", "a#2", "b#0", "b#1"]
    assert every.load("a#0").query == "the lamp"
    assert every.load("b#1").query == "second"
    for sid in ("a#1", "a#2", "b#0"):  # an unusable text fails only its own sample
        with pytest.raises(SampleError, match=r"text #\d is .*not a non-empty string") as info:
            every.load(sid)
        assert info.value.tags == ("long",)
    write_jpg(val / "c.jpg", noise_image(H, W, 3))
    write_json(val / "c.json", anno([], False, []))
    with pytest.raises(SampleError, match=r"'text' must be a non-empty list") as info:
        ReasonSegDataset(tmp_path / "R", split="val").load("c")
    assert info.value.tags == ("short",)


def test_tag_rows_count_every_sample_with_the_tag_failures_included(lisa_root: Path,
                                                                     tmp_path: Path) -> None:
    """Through the pipeline and the metrics table: a long/short row counts each sample whose
    annotation gives that tag, whether or not the sample loaded."""
    import asyncio

    from rescue import masks
    from rescue.cache import Cache
    from rescue.evaluation import evaluate
    from rescue.hypothesis import Hypothesis, Prompt
    from rescue.pipeline import Pipeline
    from rescue.protocols import Segmentation, Verdict
    from rescue.settings import EvaluationSettings

    class Planner:
        simulated = False

        def identity(self) -> dict:
            return {"name": "box"}

        async def plan(self, sample, indices):
            return [Hypothesis(index=i, prompt=Prompt(text="x", box=(0, 0, 8, 8)))
                    for i in indices]

    class Executor:
        simulated = False

        def identity(self) -> dict:
            return {"backend": "box"}

        async def segment(self, sample, prompts):
            m = np.zeros(sample.gt.shape, bool)
            m[:8, :8] = True
            return [Segmentation(rle=masks.encode(m), score=0.5, box=p.box) for p in prompts]

    class Verifier:
        simulated = False

        def identity(self) -> dict:
            return {"name": "one"}

        async def verify(self, sample, mask):
            return Verdict(score=1.0, source="parsed")

    ds = ReasonSegDataset(lisa_root, split="val")
    ids = ds.sample_ids()
    pipe = Pipeline(Planner(), Executor(), Verifier(), Cache(tmp_path / "cache"), max_n=1,
                    progress=False)
    recs = asyncio.run(pipe.run(ds, ids))
    failed = {r.sample_id for r in recs if r.error}
    assert failed == {"d", "f", "h"}
    table = evaluate(recs, EvaluationSettings(n_grid=(1,), bootstrap=0))
    truth = {"all": len(ids)}
    for sid in ids:
        for tag in ds.tags_of(sid):
            truth[tag] = truth.get(tag, 0) + 1
    assert truth == {"all": 7, "short": 5, "long": 1}  # d and f short, h untagged
    for subset, n in truth.items():
        rows = table[table.subset == subset]
        assert len(rows) and (rows.num_samples == n).all(), subset
    assert (table[table.subset == "short"].num_failed_samples == 2).all()


def test_a_query_utf8_cannot_carry_is_a_sample_error(lisa_root: Path) -> None:
    """A JSON "\\ud800" escape decodes to a lone surrogate: the sample fails with a reason,
    keeping its tags, instead of failing every model request made for it."""
    val = lisa_root / "val"
    write_json(val / "a.json", anno(["the \ud800 cup", "the cup"], True, []))
    ds = ReasonSegDataset(lisa_root, split="val", queries="all")
    with pytest.raises(SampleError, match=r"^query:bad_text reasonseg_val/a#0: .*\\ud800") as e:
        ds.load("a#0")
    assert e.value.tags == ("long",) and str(e.value).isascii()
    assert ds.load("a#1").query == "the cup"  # the annotation's other text is fine
