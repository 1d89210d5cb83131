"""RefCOCO, RefCOCO+ and RefCOCOg (referring expressions over COCO train2014).

Every sentence of every ref is its own sample, `<ref_id>#<sentence index>`, as the field's
evaluation does (LISA's ValDataset scores each sentence against its ref's mask). The mask
merges the referred annotation's COCO segmentation parts as `parts` says
(`polygons.coco_mask`): "lisa" (the default, what published numbers used) sums them as refer's
`getMask` and LISA do, so pixels where parts overlap are background; "union" takes pycocotools'
union. Listing logs once how many refs have overlapping parts, the refs where the two differ.

Layouts read from local files (never the hub):

- `rows`: one parquet row per ref, through `datasets`. The segmentation is a column
  (`segmentation`: flat polygon, polygons or RLE) or a COCO annotation serialised as JSON
  (`raw_anns` / `anns`); the image is a column (`image`, bytes) or a file in `coco_dir` named by
  `raw_image_info`/`image_info`, `image_path` or `image_id`. Sentences come from `sentences`
  (refer's dicts: `sent` is used), `captions`, `answer`, `texts` or similar.
- `images`: one parquet row per image with a `ref_list` of `{ref_info, ann_info}` and the image.
- `refer`: the original release, `refs(<split_by>).p` plus `instances.json`, images in `coco_dir`.

Rows carrying their own split (`split` column, or `ref_info.split`) are filtered on it: some
copies name the file holding testA `test`.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rescue import images, masks
from rescue.datasets import parquet
from rescue.datasets.base import DatasetError, SampleError, check_choice, guarded_load
from rescue.datasets.polygons import PARTS, AnnotationError, coco_mask, parts_overlap
from rescue.sample import Sample

log = logging.getLogger(__name__)

SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("refcoco", "google"): ("train", "val", "test"),
}
"""Valid (dataset, split_by) pairs and their splits; papers report unc val/testA/testB and umd
val/test."""

EXPECTED = {
    ("refcoco", "unc"): {"val": (3811, 10834), "testA": (1975, 5657), "testB": (1810, 5095)},
    ("refcoco+", "unc"): {"val": (3805, 10758), "testA": (1975, 5726), "testB": (1798, 4889)},
    ("refcocog", "umd"): {"val": (2573, 4896), "test": (5023, 9602)},
}
"""(refs, expressions) per evaluation split: refs from the refer release as the jxu124 copies
count them; expressions from the RefCOCO/RefCOCO+ (Yu et al. 2016) and RefCOCOg-umd
(Nagaraja et al. 2016) statistics. One sample per expression."""

LAYOUTS = ("auto", "rows", "images", "refer")
SENTENCE_COLUMNS = ("sentences", "captions", "answer", "texts", "expressions", "sentence",
                    "expression", "refs", "text")
ID_COLUMNS = ("ref_id", "question_id", "ann_id", "id")
SEGMENTATION_COLUMNS = ("segmentation", "rle")
ANN_JSON_COLUMNS = ("raw_anns", "anns", "ann", "annotation")
IMAGE_INFO_COLUMNS = ("raw_image_info", "image_info")
SIZE_COLUMNS = (("img_height", "img_width"), ("height", "width"))
_DATASET_TOKENS = {"refcoco": ("refcoco",), "refcoco+": ("refcoco_plus", "refcocoplus",
                                                         "refcoco+"),
                   "refcocog": ("refcocog",)}
ENV_HINT = ("set dataset.root, or the RESCUE_DATA environment variable (the data root; the "
            "default root is $RESCUE_DATA/<dataset>)")


@dataclass(frozen=True)
class _Ref:
    """Where one ref's pieces are; sentences are read eagerly (ids need their count)."""

    ref_id: str
    sentences: tuple[str, ...]
    row: int | None = None  # parquet row
    sub: int | None = None  # index in the row's ref_list
    ann: Mapping[str, Any] | None = None  # refer layout: the COCO annotation
    image: Mapping[str, Any] | None = None  # refer layout: the COCO image entry


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def sentences_of(value: Any) -> tuple[str, ...]:
    """Sentences from refer's dicts (their `sent`), plain strings, or one string."""
    value = _maybe_json(value)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip(),)
    out = []
    for s in value:
        if isinstance(s, Mapping):
            s = s.get("sent", s.get("raw", ""))
        out.append(str(s).strip())
    return tuple(out)


def _segmentations(seg: Any) -> list[Any]:
    """The COCO segmentations in a stored value: one, an annotation holding one, or several
    annotations (some copies put every annotation of a ref in one row)."""
    seg = _maybe_json(seg)
    if isinstance(seg, list) and seg and all(isinstance(a, Mapping) and "segmentation" in a
                                             for a in seg):
        return [a["segmentation"] for a in seg]
    if isinstance(seg, Mapping) and "segmentation" in seg:
        seg = seg["segmentation"]
    if seg is None:
        raise AnnotationError("no segmentation")
    return [seg]


def _first(row: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return None


class RefCocoDataset:
    """One split of RefCOCO / RefCOCO+ / RefCOCOg as `Sample`s."""

    def __init__(self, root: str | Path, dataset: str = "refcoco", split: str = "val",
                 split_by: str | None = None, layout: str = "auto",
                 coco_dir: str | Path | None = None,
                 data_files: str | list[str] | None = None,
                 cache_dir: str | Path | None = None, name: str | None = None,
                 parts: str = "lisa") -> None:
        split_by = split_by or ("umd" if dataset == "refcocog" else "unc")
        if (dataset, split_by) not in SPLITS:
            raise DatasetError(f"unknown dataset/split_by {dataset}/{split_by}; valid: "
                               f"{', '.join(f'{d}/{s}' for d, s in SPLITS)}")
        valid = SPLITS[(dataset, split_by)]
        if split not in valid:
            raise DatasetError(f"{dataset} ({split_by}) has no split {split!r}; valid splits: "
                               f"{', '.join(valid)}")
        check_choice("layout", layout, LAYOUTS)
        check_choice("parts", parts, PARTS)
        self.root = Path(root).expanduser()
        self.dataset, self.split, self.split_by = dataset, split, split_by
        self.parts = parts
        self.coco_dir = Path(coco_dir).expanduser() if coco_dir else None
        self.name = name or f"{dataset}_{split}".replace("+", "plus")
        self._cache_dir = cache_dir
        if not self.root.exists():
            raise DatasetError(f"{dataset} data not found: {self.root} ({ENV_HINT})")
        refs_file = self.root / f"refs({split_by}).p"
        if layout == "refer" or (layout == "auto" and refs_file.is_file()):
            self.layout = "refer"
            self._files = [refs_file, self.root / "instances.json"]
            for f in self._files:
                if not f.is_file():
                    raise DatasetError(f"{dataset}: refer layout needs {f} ({ENV_HINT})")
        else:
            self._files = self._select_parquet(data_files)
            self.layout = layout if layout != "auto" else "?"  # settled once the schema is read
        self._ds: Any = None
        self._light: Any = None  # the parquet rows without their images
        self._refs: list[_Ref] | None = None
        self._index: dict[str, tuple[_Ref, int]] = {}
        self._ids: list[str] = []
        self.overlapping_refs: tuple[str, ...] = ()
        """Refs of this split whose segmentation parts overlap; set by `sample_ids()`."""

    # ------------------------------------------------------------------ files

    def _select_parquet(self, data_files: str | list[str] | None) -> list[Path]:
        found = parquet.parquet_files(self.root, data_files) if self.root.is_dir() else (
            [self.root] if self.root.suffix == ".parquet" else [])
        if not found:
            raise DatasetError(f"{self.dataset}: no parquet files under {self.root} and no "
                               f"refs({self.split_by}).p ({ENV_HINT})")
        if data_files is not None or self.root.is_file():
            return found
        found = self._same_dataset(found)
        known = SPLITS[(self.dataset, self.split_by)]
        by_split = parquet.files_by_split(found, self.root, known)
        import pyarrow.parquet as pq

        if "split" in pq.read_schema(found[0]).names:
            # Rows say which split they are in; read every file that may hold this split.
            return [f for f in found
                    if self.split == "train" or parquet.file_split(f, self.root, known) != "train"]
        if self.split not in by_split:
            raise DatasetError(f"{self.dataset}: no parquet file for split {self.split!r} under "
                               f"{self.root} (splits found: {sorted(by_split)}; valid: "
                               f"{', '.join(known)}) ({ENV_HINT})")
        return by_split[self.split]

    def _same_dataset(self, files: list[Path]) -> list[Path]:
        """Where one folder holds several datasets (`refcoco_unc_val-*`, `refcocog_umd_val-*`),
        keep this dataset's files."""
        def tag(f: Path) -> str | None:
            stem = f.stem.lower()
            for ds, toks in sorted(_DATASET_TOKENS.items(), key=lambda kv: -len(kv[0])):
                for t in sorted(toks, key=len, reverse=True):
                    if stem.startswith(t) and not stem[len(t):len(t) + 1].isalnum():
                        return ds
            return None
        tags = {tag(f) for f in files}
        if len(tags - {None}) <= 1:
            return files
        return [f for f in files if tag(f) == self.dataset]

    def _dataset(self) -> Any:
        if self._ds is None:
            self._ds = parquet.load_parquet(self._files, self._cache_dir)
            cols = set(self._ds.column_names)
            if self.layout == "?":
                self.layout = "images" if "ref_list" in cols else "rows"
        return self._ds

    # ------------------------------------------------------------------ ids

    def sample_ids(self) -> list[str]:
        if self._refs is None:
            refs = self._refer_refs() if self.layout == "refer" else self._parquet_refs()
            seen: Counter[str] = Counter()
            uniq = []
            for r in refs:  # ids stay unique even where a copy repeats a ref id
                seen[r.ref_id] += 1
                rid = r.ref_id if seen[r.ref_id] == 1 else f"{r.ref_id}~{seen[r.ref_id] - 1}"
                uniq.append(r if rid == r.ref_id else _Ref(rid, r.sentences, r.row, r.sub,
                                                            r.ann, r.image))
            self._refs = uniq
            for r in uniq:
                for k in range(len(r.sentences)):
                    sid = f"{r.ref_id}#{k}"
                    self._index[sid] = (r, k)
                    self._ids.append(sid)
            self.overlapping_refs = tuple(r.ref_id for r in uniq if self._overlaps(r))
            what = ("background, as refer + LISA compute it" if self.parts == "lisa"
                    else "target (their union), unlike LISA's")
            log.info("%s: %d of %d refs have overlapping segmentation parts; dataset.parts=%s: "
                     "their overlap pixels are %s", self.name, len(self.overlapping_refs),
                     len(uniq), self.parts, what)
        return list(self._ids)

    def _overlaps(self, ref: _Ref) -> bool:
        """Whether `ref`'s parts overlap, from its annotation alone (no image decoded); False
        where that cannot be read (its load says why)."""
        try:
            seg, h, w = self._segmentation_and_size(ref)
            return any(parts_overlap(s, h, w) for s in _segmentations(seg))
        except Exception:
            return False

    def _segmentation_and_size(self, ref: _Ref) -> tuple[Any, int | None, int | None]:
        if self.layout == "refer":
            image = ref.image or {}
            return (ref.ann or {}).get("segmentation"), image.get("height"), image.get("width")
        if self._light is None:
            ds = self._dataset()
            keep = [c for c in (*SEGMENTATION_COLUMNS, *ANN_JSON_COLUMNS, *IMAGE_INFO_COLUMNS,
                                *(c for pair in SIZE_COLUMNS for c in pair), "ref_list")
                    if c in ds.column_names]
            self._light = ds.select_columns(keep)
        rec = self._light[ref.row]
        if self.layout == "images":
            entries = rec.get("ref_list") or []
            entry = entries[ref.sub] if ref.sub is not None and ref.sub < len(entries) else {}
            seg = (entry.get("ann_info") or {}).get("segmentation")
            info = _maybe_json(rec.get("image_info"))
        else:
            seg = _first(rec, SEGMENTATION_COLUMNS)
            if seg is None:
                seg = _first(rec, ANN_JSON_COLUMNS)
            info = _maybe_json(_first(rec, IMAGE_INFO_COLUMNS))
        info = info if isinstance(info, Mapping) else {}
        h, w = info.get("height"), info.get("width")
        for hc, wc in SIZE_COLUMNS:
            if h is None or w is None:
                h, w = rec.get(hc), rec.get(wc)
        return seg, (int(h) if h is not None else None), (int(w) if w is not None else None)

    def _split_ok(self, value: Any) -> bool:
        return value is None or parquet.canonical_split(str(value)) == self.split

    def _parquet_refs(self) -> list[_Ref]:
        ds = self._dataset()
        image_cols = [c for c, f in ds.features.items() if type(f).__name__ == "Image"]
        light = ds.remove_columns(image_cols + [c for c in SEGMENTATION_COLUMNS
                                                if c in ds.column_names])
        refs: list[_Ref] = []
        for row, rec in enumerate(light):
            if self.layout == "images":
                for j, entry in enumerate(rec.get("ref_list") or []):
                    info = entry.get("ref_info") or {}
                    if self._split_ok(info.get("split")):
                        refs.append(_Ref(str(info.get("ref_id", f"{row}.{j}")),
                                         sentences_of(info.get("sentences")), row, j))
                continue
            if not self._split_ok(rec.get("split")):
                continue
            rid = _first(rec, ID_COLUMNS)
            refs.append(_Ref(str(row if rid is None else rid),
                             sentences_of(_first(rec, SENTENCE_COLUMNS)), row))
        if not refs:
            raise DatasetError(f"{self.dataset}: no refs of split {self.split!r} in "
                               f"{[str(f) for f in self._files]}")
        return refs

    def _refer_refs(self) -> list[_Ref]:
        refs_file, inst_file = self._files
        try:
            with open(refs_file, "rb") as f:
                try:
                    all_refs = pickle.load(f)  # the release's own pickle, read from local disk
                except UnicodeDecodeError:
                    f.seek(0)
                    all_refs = pickle.load(f, encoding="latin1")  # written by Python 2
            inst = json.loads(inst_file.read_text(encoding="utf-8"))
            anns = {a["id"]: a for a in inst["annotations"]}
            imgs = {i["id"]: i for i in inst["images"]}
        except (OSError, pickle.UnpicklingError, EOFError, json.JSONDecodeError, KeyError,
                TypeError) as e:
            raise DatasetError(f"{self.dataset}: cannot read {refs_file} / {inst_file}: {e}") from e
        out = []
        for r in all_refs:
            if r.get("split") != self.split:
                continue
            out.append(_Ref(str(r["ref_id"]), sentences_of(r.get("sentences")),
                            ann=anns.get(r.get("ann_id")), image=imgs.get(r.get("image_id"))))
        return out

    # ------------------------------------------------------------------ load

    def load(self, sample_id: str) -> Sample:
        return guarded_load(self.name, sample_id, self._load)

    def _load(self, sample_id: str) -> Sample:
        if self._refs is None:
            self.sample_ids()
        if sample_id not in self._index:
            raise SampleError(f"{self.name}: unknown sample id {sample_id!r}")
        ref, k = self._index[sample_id]
        what = f"{self.name}/{sample_id}"
        query = ref.sentences[k]
        if not query:
            raise SampleError(f"{what}: sentence {k} is empty")
        if self.layout == "refer":
            if ref.ann is None or ref.image is None:
                raise SampleError(f"{what}: ref {ref.ref_id} points at an annotation or image "
                                  "missing from instances.json")
            image = self._coco_image(what, [ref.image.get("file_name")], ref.image.get("id"))
            seg: Any = ref.ann.get("segmentation")
        else:
            image, seg = self._row_image_and_segmentation(ref, what)
        h, w = image.shape[:2]
        try:
            gt = np.zeros((h, w), bool)
            for s in _segmentations(seg):  # several annotations in one row: their union
                gt |= coco_mask(s, h, w, self.parts)
            gt = gt.astype(np.uint8)
        except AnnotationError as e:
            raise SampleError(f"{what}: malformed annotation: {e}") from e
        box = masks.bbox(gt == 1)
        return Sample(sample_id=sample_id, query=query, image=image, gt=gt, dataset=self.name,
                      target_boxes=(box,) if box else ())

    def _row_image_and_segmentation(self, ref: _Ref, what: str) -> tuple[np.ndarray, Any]:
        ds = self._dataset()
        rec = ds[ref.row]
        where = f"{what} (row {ref.row})"
        if self.layout == "images":
            entries = rec.get("ref_list") or []
            entry = entries[ref.sub] if ref.sub is not None and ref.sub < len(entries) else {}
            seg = (entry.get("ann_info") or {}).get("segmentation")
            info = _maybe_json(rec.get("image_info")) or {}
        else:
            seg = _first(rec, SEGMENTATION_COLUMNS)
            if seg is None:
                seg = _first(rec, ANN_JSON_COLUMNS)
            info = _maybe_json(_first(rec, IMAGE_INFO_COLUMNS)) or {}
        if seg is None:
            raise SampleError(f"{where}: malformed row: no segmentation (looked for "
                              f"{SEGMENTATION_COLUMNS + ANN_JSON_COLUMNS + ('ref_list',)})")
        if rec.get("image") is not None:
            return parquet.image_cell(rec["image"], where, self.root), seg
        info = info if isinstance(info, Mapping) else {}
        names = [info.get("file_name"),
                 Path(str(rec["image_path"])).name if rec.get("image_path") else None]
        return self._coco_image(where, names, info.get("id", rec.get("image_id"))), seg

    def _coco_image(self, what: str, names: list[Any], image_id: Any) -> np.ndarray:
        if self.coco_dir is None:
            raise SampleError(f"{what}: images live in COCO train2014; set dataset.coco_dir")
        cands = [str(n) for n in names if n]
        if isinstance(image_id, int | str) and str(image_id).isdigit():
            cands.append(f"COCO_train2014_{int(image_id):012d}.jpg")
        for n in cands:
            p = self.coco_dir / n
            if p.is_file():
                return images.read(p)
        raise SampleError(f"{what}: image missing: tried "
                          f"{[str(self.coco_dir / n) for n in cands] or 'no file name'}")

    def __len__(self) -> int:
        return len(self.sample_ids())

    def __repr__(self) -> str:
        return (f"RefCocoDataset(dataset={self.dataset!r}, split={self.split!r}, "
                f"split_by={self.split_by!r}, layout={self.layout!r}, parts={self.parts!r}, "
                f"root={str(self.root)!r})")
