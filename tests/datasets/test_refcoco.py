"""RefCOCO-family loaders against fixtures in each layout: rows with images and polygons or RLE
(lmms-lab style), rows pointing into COCO train2014 (jxu124 style, `raw_anns`), one row per
image with a `ref_list`, and the original refer release (pickle + instances.json)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from dataset_fixtures import box_truth, coco_rect, noise_image, png_bytes, write_jpg
from pycocotools import mask as mask_utils

from rescue.datasets.base import Dataset, DatasetError, SampleError
from rescue.datasets.polygons import PARTS, AnnotationError, coco_mask, parts_overlap
from rescue.datasets.refcoco import EXPECTED, SPLITS, RefCocoDataset
from rescue.metrics import iou_counts

H, W = 20, 30
IMAGES = {1: noise_image(H, W, 1), 2: noise_image(H, W, 2), 3: noise_image(H, W, 3)}


def hand_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE by hand: run lengths of the column-major pixels, zeros first."""
    flat = mask.astype(bool).flatten(order="F")
    counts, cur, run = [], False, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def _donut() -> np.ndarray:
    m = box_truth((H, W), (16, 3, 28, 15), inclusive=False)
    m[6:10, 20:24] = 0
    return m


DONUT = _donut()
RING_RLE = mask_utils.encode(np.asfortranarray(DONUT))
RING_RLE = {"size": [H, W], "counts": RING_RLE["counts"].decode("ascii")}

# ref_id, ann_id, image_id, split, sentences, segmentation, truth
REFS = [
    (101, 9001, 1, "val", ["left dog", "the brown dog"],
     [coco_rect(2, 2, 8, 10), coco_rect(12, 5, 15, 9)],  # two parts
     box_truth((H, W), (2, 2, 8, 10), (12, 5, 15, 9), inclusive=False)),
    (102, 9002, 1, "val", ["donut"], RING_RLE, DONUT),  # compressed RLE with a hole
    (103, 9003, 2, "val", ["ring again", "hole", "third"], hand_rle(DONUT), DONUT),
    (201, 9004, 3, "testA", ["man on the right"], [coco_rect(0, 0, 30, 20)],
     np.ones((H, W), np.uint8)),
    (301, 9005, 2, "testB", ["cup"], [coco_rect(5, 5, 7, 7)],
     box_truth((H, W), (5, 5, 7, 7), inclusive=False)),
    (401, 9006, 3, "train", ["train only"], [coco_rect(1, 1, 3, 3)],
     box_truth((H, W), (1, 1, 3, 3), inclusive=False)),
]
VAL_IDS = ["101#0", "101#1", "102#0", "103#0", "103#1", "103#2"]


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def sent_dicts(sents: list[str], ref_id: int) -> list[dict]:
    return [{"raw": s.upper(), "sent": s, "sent_id": ref_id * 10 + k, "tokens": s.split()}
            for k, s in enumerate(sents)]


def _to_parquet(path: Path, cols: dict, features: dict | None = None) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    feats = datasets.Features(features) if features else None
    datasets.Dataset.from_dict(cols, features=feats).to_parquet(str(path))


def _check_val(ds: RefCocoDataset, images_exact: bool = True) -> None:
    assert isinstance(ds, Dataset)
    assert ds.sample_ids() == VAL_IDS
    for sid in VAL_IDS:
        ref_id, k = sid.split("#")
        ref = next(r for r in REFS if str(r[0]) == ref_id)
        s = ds.load(sid)
        assert s.query == ref[4][int(k)]
        np.testing.assert_array_equal(s.gt, ref[6], err_msg=sid)
        if images_exact:
            np.testing.assert_array_equal(s.image, IMAGES[ref[2]])
        assert s.image.shape == (H, W, 3)
    assert ds.load("101#0").target_boxes == ((2.0, 2.0, 15.0, 10.0),)


# ---------------------------------------------------------------------- layout A: rows + image


def _rows_with_images(root: Path, split: str, seg_as_json: bool = False) -> None:
    import datasets

    rows = [r for r in REFS if r[3] == split]
    cols = {
        "question_id": [str(r[0]) for r in rows],
        "image": [{"bytes": png_bytes(IMAGES[r[2]]), "path": None} for r in rows],
        "question": ["Please describe the region." for _ in rows],
        "answer": [r[4] for r in rows],
        "segmentation": [json.dumps(r[5]) for r in rows] if seg_as_json else None,
        "file_name": [coco_name(r[2]) for r in rows],
    }
    feats = {"question_id": datasets.Value("string"), "image": datasets.Image(),
             "question": datasets.Value("string"),
             "answer": datasets.List(datasets.Value("string")),
             "segmentation": datasets.Value("string"), "file_name": datasets.Value("string")}
    if not seg_as_json:
        # lmms-lab stores one flat polygon per row; keep the single-part refs in that form
        cols["segmentation"] = [r[5][0] if isinstance(r[5], list) and len(r[5]) == 1 else [0.0]
                                for r in rows]
        feats["segmentation"] = datasets.List(datasets.Value("float32"))
    _to_parquet(root / "data" / f"{split}-00000-of-00001.parquet", cols, feats)


def test_rows_with_images_polygons_and_rle(tmp_path: Path, hf_cache: Path) -> None:
    root = tmp_path / "refcoco_rows"
    for split in ("val", "testA", "testB"):
        _rows_with_images(root, split, seg_as_json=True)
    ds = RefCocoDataset(root, dataset="refcoco", split="val", cache_dir=hf_cache)
    _check_val(ds)
    assert ds.layout == "rows" and ds.name == "refcoco_val"
    ta = RefCocoDataset(root, dataset="refcoco", split="testA", cache_dir=hf_cache)
    assert ta.sample_ids() == ["201#0"]
    assert ta.load("201#0").gt.all()


def test_rows_with_flat_float_polygon(tmp_path: Path, hf_cache: Path) -> None:
    root = tmp_path / "lmms"
    _rows_with_images(root, "testB")
    ds = RefCocoDataset(root, dataset="refcoco+", split="testB", cache_dir=hf_cache)
    s = ds.load("301#0")
    np.testing.assert_array_equal(s.gt, REFS[4][6])
    assert ds.name == "refcocoplus_testB"


# ---------------------------------------------------------------------- layout B: raw_anns


def _raw_anns_rows(root: Path, coco: Path, file_split: dict[str, str],
                   table: list[tuple] = REFS) -> None:
    """jxu124-style rows; `file_split` maps a row split to its file name (testA lives in 'test')."""
    for r in table:
        write_jpg(coco / coco_name(r[2]), IMAGES[r[2]])
    by_file: dict[str, list] = {}
    for r in table:
        by_file.setdefault(file_split[r[3]], []).append(r)
    for fname, rows in by_file.items():
        cols = {
            "sent_ids": [[r[0] * 10 + k for k in range(len(r[4]))] for r in rows],
            "file_name": [coco_name(r[2]).replace(".jpg", f"_{r[1]}.jpg") for r in rows],
            "ann_id": [r[1] for r in rows], "ref_id": [r[0] for r in rows],
            "image_id": [r[2] for r in rows], "split": [r[3] for r in rows],
            "sentences": [sent_dicts(r[4], r[0]) for r in rows],
            "category_id": [1 for _ in rows],
            "raw_anns": [json.dumps({"segmentation": r[5], "area": 1.0, "iscrowd": 0,
                                     "image_id": r[2], "bbox": [0, 0, 1, 1], "category_id": 1,
                                     "id": r[1]}) for r in rows],
            "raw_image_info": [json.dumps({"file_name": coco_name(r[2]), "height": H,
                                           "width": W, "id": r[2]}) for r in rows],
            "image_path": [f"coco/train2014/{coco_name(r[2])}" for r in rows],
            "captions": [r[4] for r in rows],
        }
        _to_parquet(root / "data" / f"{fname}-00000-of-00001.parquet", cols)


def _jpeg(image_id: int, coco: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(coco / coco_name(image_id))), cv2.COLOR_BGR2RGB)


def test_raw_anns_rows_pointing_into_coco(tmp_path: Path, hf_cache: Path) -> None:
    root, coco = tmp_path / "jxu124_refcoco", tmp_path / "coco" / "train2014"
    _raw_anns_rows(root, coco, {"train": "train", "val": "validation", "testA": "test",
                                "testB": "testB"})
    ds = RefCocoDataset(root, dataset="refcoco", split="val", coco_dir=coco, cache_dir=hf_cache)
    _check_val(ds, images_exact=False)
    np.testing.assert_array_equal(ds.load("103#1").image, _jpeg(2, coco))
    # testA rows sit in the file named 'test': the rows' own split column decides
    ta = RefCocoDataset(root, dataset="refcoco", split="testA", coco_dir=coco,
                        cache_dir=hf_cache)
    assert ta.sample_ids() == ["201#0"]
    assert RefCocoDataset(root, split="train", coco_dir=coco,
                          cache_dir=hf_cache).sample_ids() == ["401#0"]
    # an image missing from the COCO folder fails that sample only
    (coco / coco_name(3)).unlink()
    with pytest.raises(SampleError, match=r"201#0.*image missing.*COCO_train2014_000000000003"):
        ta.load("201#0")
    (coco / coco_name(2)).write_bytes(b"not a jpeg")
    with pytest.raises(SampleError, match=r"^image:unsupported .*000000000002\.jpg"):
        ds.load("103#0")
    assert ds.load("101#1").gt.sum() == 6 * 8 + 3 * 4
    nococo = RefCocoDataset(root, split="val", cache_dir=hf_cache)
    with pytest.raises(SampleError, match=r"set dataset\.coco_dir"):
        nococo.load("101#0")


def test_refcocog_umd_splits(tmp_path: Path, hf_cache: Path) -> None:
    root, coco = tmp_path / "g", tmp_path / "coco"
    _raw_anns_rows(root, coco, {"train": "train", "val": "val", "testA": "test", "testB": "test"})
    with pytest.raises(DatasetError, match=r"refcocog \(umd\) has no split 'testA'; valid "
                                           r"splits: train, val, test"):
        RefCocoDataset(root, dataset="refcocog", split="testA")
    ds = RefCocoDataset(root, dataset="refcocog", split="val", coco_dir=coco, cache_dir=hf_cache)
    assert ds.split_by == "umd" and ds.sample_ids() == VAL_IDS


# ---------------------------------------------------------------------- layout C: per image


def _image_rows(path: Path, split: str) -> None:
    import datasets

    by_image: dict[int, list] = {}
    for r in REFS:
        if r[3] == split:
            by_image.setdefault(r[2], []).append(r)
    ids = sorted(by_image)
    ref_list = []
    for i in ids:
        entries = []
        for r in by_image[i]:
            entries.append({
                "ann_info": {"area": 1.0, "bbox": [0.0, 0.0, 1.0, 1.0], "category_id": 1,
                             "id": r[1], "image_id": i, "iscrowd": 0,
                             "segmentation": json.dumps(r[5])},
                "ref_info": {"ann_id": r[1], "category_id": 1, "file_name": coco_name(i),
                             "image_id": i, "ref_id": r[0], "sent_ids": [0],
                             "sentences": sent_dicts(r[4], r[0]), "split": r[3]},
            })
        ref_list.append(entries)
    cols = {"ref_list": ref_list,
            "image_info": [{"file_name": coco_name(i), "height": H, "width": W, "id": i}
                           for i in ids],
            "image": [{"bytes": png_bytes(IMAGES[i]), "path": None} for i in ids]}
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(cols)
    ds = ds.cast_column("image", datasets.Image())
    ds.to_parquet(str(path))


def test_rows_per_image_with_ref_list(tmp_path: Path, hf_cache: Path) -> None:
    data = tmp_path / "bench" / "data"
    _image_rows(data / "refcoco_unc_val-00000-of-00001-abc.parquet", "val")
    _image_rows(data / "refcocog_umd_val-00000-of-00001-def.parquet", "testA")
    _image_rows(data / "refcoco_plus_unc_val-00000-of-00001-123.parquet", "testB")
    ds = RefCocoDataset(tmp_path / "bench", dataset="refcoco", split="val", cache_dir=hf_cache)
    _check_val(ds)
    assert ds.layout == "images"
    # the refcoco+ file of that folder is picked for refcoco+ (its rows say testB)
    plus = RefCocoDataset(tmp_path / "bench", dataset="refcoco+", split="val",
                          cache_dir=hf_cache)
    with pytest.raises(DatasetError, match="no refs of split 'val'"):
        plus.sample_ids()


# ---------------------------------------------------------------------- layout D: refer


def _refer_release(root: Path, coco: Path, split_by: str = "unc",
                   table: list[tuple] = REFS) -> None:
    root.mkdir(parents=True)
    refs, anns = [], []
    for r in table:
        write_jpg(coco / coco_name(r[2]), IMAGES[r[2]])
        refs.append({"ref_id": r[0], "ann_id": r[1], "image_id": r[2], "split": r[3],
                     "sentences": sent_dicts(r[4], r[0]), "sent_ids": [0], "category_id": 1,
                     "file_name": coco_name(r[2]).replace(".jpg", f"_{r[1]}.jpg")})
        anns.append({"id": r[1], "image_id": r[2], "segmentation": r[5], "area": 1.0,
                     "iscrowd": int(isinstance(r[5], dict)), "bbox": [0, 0, 1, 1],
                     "category_id": 1})
    refs.append({"ref_id": 999, "ann_id": 12345, "image_id": 1, "split": "val",
                 "sentences": sent_dicts(["dangling"], 999), "sent_ids": [0],
                 "category_id": 1, "file_name": "x.jpg"})
    images = [{"id": i, "file_name": coco_name(i), "height": H, "width": W} for i in IMAGES]
    with open(root / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                     "categories": []}))


def test_refer_release(tmp_path: Path) -> None:
    root, coco = tmp_path / "refcoco", tmp_path / "train2014"
    _refer_release(root, coco)
    ds = RefCocoDataset(root, dataset="refcoco", split="val", coco_dir=coco)
    assert ds.layout == "refer"
    assert ds.sample_ids() == [*VAL_IDS, "999#0"]
    for sid in VAL_IDS:
        ref = next(r for r in REFS if str(r[0]) == sid.split("#")[0])
        np.testing.assert_array_equal(ds.load(sid).gt, ref[6])
    with pytest.raises(SampleError, match=r"missing from instances\.json"):
        ds.load("999#0")


# ---------------------------------------------------------------------- errors and facts


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"has no split 'test'; valid splits: train, val, "
                                           r"testA, testB"):
        RefCocoDataset(tmp_path, dataset="refcoco", split="test")
    with pytest.raises(DatasetError, match=r"refcoco data not found: .*missing.*RESCUE_DATA"):
        RefCocoDataset(tmp_path / "missing", dataset="refcoco", split="val")
    with pytest.raises(DatasetError, match="no parquet files"):
        RefCocoDataset(tmp_path, dataset="refcoco", split="val")
    with pytest.raises(DatasetError, match="unknown dataset/split_by"):
        RefCocoDataset(tmp_path, dataset="refclef", split="val")


def test_missing_split_file_lists_found_splits(tmp_path: Path, hf_cache: Path) -> None:
    root = tmp_path / "r"
    _rows_with_images(root, "val", seg_as_json=True)
    with pytest.raises(DatasetError, match=r"no parquet file for split 'testB'.*found: \['val'\]"):
        RefCocoDataset(root, dataset="refcoco", split="testB", cache_dir=hf_cache)


def test_malformed_segmentation_is_a_sample_error(tmp_path: Path, hf_cache: Path) -> None:
    import datasets

    root = tmp_path / "bad"
    cols = {"ref_id": [1, 2], "sentences": [["odd polygon"], ["rle of another size"]],
            "image": [{"bytes": png_bytes(IMAGES[1]), "path": None}] * 2,
            "segmentation": [json.dumps([[1, 2, 3, 4, 5]]),
                             json.dumps({"size": [5, 5], "counts": [25]})]}
    path = root / "val.parquet"
    path.parent.mkdir(parents=True)
    d = datasets.Dataset.from_dict(cols).cast_column("image", datasets.Image())
    d.to_parquet(str(path))
    ds = RefCocoDataset(root, split="val", cache_dir=hf_cache)
    with pytest.raises(SampleError, match=r"1#0.*malformed annotation: polygon 0 has an odd"):
        ds.load("1#0")
    with pytest.raises(SampleError, match=r"RLE size \[5, 5\] does not match"):
        ds.load("2#0")


def test_coco_mask_rules() -> None:
    for parts in PARTS:
        assert not coco_mask([], H, W, parts).any()  # an empty segmentation: empty target
        assert not coco_mask([[1, 1, 5, 1]], H, W, parts).any()  # two points enclose nothing
    # the same ring twice: its union is the ring, LISA's sum is 2 everywhere on it
    twice = [RING_RLE, hand_rle(DONUT)]
    np.testing.assert_array_equal(coco_mask(twice, H, W, "union"), DONUT.astype(bool))
    assert not coco_mask(twice, H, W, "lisa").any()
    assert parts_overlap(twice, H, W) and not parts_overlap([RING_RLE], H, W)
    with pytest.raises(ValueError, match="parts must be one of"):
        coco_mask([], H, W, "sum")
    with pytest.raises(AnnotationError, match="non-numeric"):
        coco_mask([[1, 1, "a", 2, 3, 4]], H, W)
    with pytest.raises(AnnotationError, match="polygons or RLE"):
        coco_mask(7, H, W)


def test_documented_counts() -> None:
    assert SPLITS[("refcoco", "unc")] == ("train", "val", "testA", "testB")
    assert SPLITS[("refcocog", "umd")] == ("train", "val", "test")
    # refer release totals: RefCOCO 142,210 expressions / 50,000 refs; the eval splits above
    assert sum(e for _, e in EXPECTED[("refcoco", "unc")].values()) == 10834 + 5657 + 5095
    assert EXPECTED[("refcocog", "umd")]["test"] == (5023, 9602)


# ---------------------------------------------------------------------- overlapping parts


def _count(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """How many of the boxes (pycocotools' pixels: far edges exclusive) cover each pixel."""
    return sum((box_truth(shape, b, inclusive=False) for b in boxes),
               np.zeros(shape, np.int64))


A, B, C = (2, 2, 12, 12), (8, 6, 20, 16), (10, 0, 14, 19)
OVERLAP_REFS = [  # ref_id, ann_id, image_id, split, sentences, segmentation, per-pixel count
    (501, 9101, 1, "val", ["two boxes"], [coco_rect(*A), coco_rect(*B)], _count((H, W), A, B)),
    (502, 9102, 2, "val", ["three", "again"], [coco_rect(*A), coco_rect(*B), coco_rect(*C)],
     _count((H, W), A, B, C)),
    (503, 9103, 3, "val", ["apart"], [coco_rect(0, 0, 3, 3), coco_rect(20, 10, 25, 15)],
     _count((H, W), (0, 0, 3, 3), (20, 10, 25, 15))),
]


def _lisa_target(seg: list, h: int, w: int) -> np.ndarray:
    """LISA's ValDataset, verbatim in effect: frPyObjects on the parts, decode, sum, uint8."""
    m = mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
    return np.sum(m, axis=2).astype(np.uint8)


def _lisa_iu(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """LISA's intersectionAndUnionGPU(pred, target, K=2, ignore_index=255), class 1: torch.histc
    over [0, 1] with 2 bins counts the values 0 and 1 only (a 2 falls outside every bin)."""
    out = pred.astype(np.int64).ravel().copy()
    tgt = target.astype(np.int64).ravel()
    out[tgt == 255] = 255
    inter = out[out == tgt]
    i1, o1, t1 = (int(np.count_nonzero(v == 1)) for v in (inter, out, tgt))
    return i1, o1 + t1 - i1


def test_overlapping_parts_lisa_sums_union_unites(tmp_path: Path, caplog) -> None:
    root, coco = tmp_path / "refcoco", tmp_path / "train2014"
    _refer_release(root, coco, table=OVERLAP_REFS)
    for r in OVERLAP_REFS:  # the hand counts are what LISA's own recipe gives
        np.testing.assert_array_equal(_lisa_target(r[5], H, W), r[6])
    with caplog.at_level("INFO", logger="rescue.datasets.refcoco"):
        lisa = RefCocoDataset(root, split="val", coco_dir=coco)
        lisa.sample_ids()
        lisa.sample_ids()  # listed once: logged once
    union = RefCocoDataset(root, split="val", coco_dir=coco, parts="union")
    union.sample_ids()
    assert lisa.parts == "lisa"  # the default
    assert lisa.overlapping_refs == union.overlapping_refs == ("501", "502")
    said = [m for m in caplog.messages if "overlapping segmentation parts" in m]
    assert said == ["refcoco_val: 2 of 4 refs have overlapping segmentation parts; "
                    "dataset.parts=lisa: their overlap pixels are background, as refer + LISA "
                    "compute it"]
    for r in OVERLAP_REFS:
        for k in range(len(r[4])):
            sid = f"{r[0]}#{k}"
            np.testing.assert_array_equal(lisa.load(sid).gt, (r[6] == 1).astype(np.uint8))
            np.testing.assert_array_equal(union.load(sid).gt, (r[6] > 0).astype(np.uint8))
            merged = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(r[5], H, W)))
            np.testing.assert_array_equal(union.load(sid).gt, merged)  # pycocotools' union


def test_parts_lisa_scores_exactly_as_lisas_metric() -> None:
    """Overlap pixels as background give LISA's class-1 intersection and union for any
    prediction; as IGNORE they would not (a prediction there is in LISA's union)."""
    rng = np.random.default_rng(0)
    for r in OVERLAP_REFS:
        raw = _lisa_target(r[5], H, W)
        ours = coco_mask(r[5], H, W, "lisa").astype(np.uint8)
        as_ignore = np.where(raw > 1, 255, raw).astype(np.uint8)
        for pred in [raw > 0, raw == 1, raw > 1, *(rng.random((50, H, W)) < 0.5)]:
            assert iou_counts(pred, ours) == _lisa_iu(pred, raw)
            touches = bool((pred & (raw > 1)).any())  # predicts an overlap pixel
            assert (iou_counts(pred, as_ignore) != _lisa_iu(pred, raw)) == touches
    # the example: a prediction equal to the union scores below 1 with LISA
    raw = _lisa_target(OVERLAP_REFS[0][5], H, W)
    i, u = _lisa_iu(raw > 0, raw)
    assert i / u < 1 and iou_counts(raw > 0, coco_mask(OVERLAP_REFS[0][5], H, W)) == (i, u)


def test_overlap_count_in_row_layouts(tmp_path: Path, hf_cache: Path) -> None:
    root, coco = tmp_path / "rows", tmp_path / "coco"
    _raw_anns_rows(root, coco, {"val": "val"}, table=OVERLAP_REFS)
    ds = RefCocoDataset(root, split="val", coco_dir=coco, cache_dir=hf_cache)
    assert ds.overlapping_refs == () and ds.sample_ids()
    assert ds.overlapping_refs == ("501", "502")
    np.testing.assert_array_equal(ds.load("502#1").gt, (OVERLAP_REFS[1][6] == 1).astype(np.uint8))
    with pytest.raises(DatasetError, match="parts must be one of"):
        RefCocoDataset(root, split="val", parts="sum")
