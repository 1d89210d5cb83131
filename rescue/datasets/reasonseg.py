"""ReasonSeg (LISA, CVPR 2024): reasoning-segmentation queries over 1218 images.

Two layouts:

- LISA's release: `<root>/<split>/<name>.jpg` beside `<name>.json` (labelme: `text` list of
  queries, `is_sentence`, `shapes` with labels target / ignore / flag). Samples are the `*.jpg`
  stems, as LISA globs them (a JSON without its image is no sample; an image without its JSON
  is a failed one). The mask is LISA's `get_mask_from_json` pixel for pixel, under OpenCV 4.8's
  rules whatever OpenCV is installed (`polygons.labelme_mask`, `raster`): ignore pixels become
  255 and count in neither intersection nor union.
- Hugging Face parquet copies of val/test: columns `image`, `text`, `mask` (bool H x W),
  `image_id`, `ann_id`, `img_height`, `img_width`. They carry a binary mask (no ignore label)
  and no `is_sentence`, so the long/short split of test needs the LISA release.

LISA evaluates each image once with `text[0]` (stripped), and so do we: later texts are not
read, so an empty one rejects nothing. `queries="all"` makes every text its own sample
(`<image>#<k>`) for studies that want more queries per image; an empty text fails only its own.
A sample that fails to load keeps the long/short tag its readable JSON gives (`tags_of`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rescue import images, masks
from rescue.datasets import parquet
from rescue.datasets.base import DatasetError, SampleError, check_choice, guarded_load
from rescue.datasets.polygons import AnnotationError, labelme_mask
from rescue.sample import Sample

SPLITS = ("train", "val", "test")
EXPECTED_IMAGES = {"train": 239, "val": 200, "test": 779}
"""Images per split in LISA's release (1218 in all); the parquet copies hold val and test."""

QUERY_POLICIES = ("first", "all")
LAYOUTS = ("auto", "lisa", "parquet")
IMAGE_SUFFIX = ".jpg"
"""LISA lists `glob("*.jpg")`: that suffix exactly (case-sensitive), no hidden files."""
ENV_HINT = ("set dataset.root, or the RESCUE_DATA environment variable (the data root; "
            "ReasonSeg is looked for in $RESCUE_DATA/reason_seg/ReasonSeg)")


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SampleError(f"annotation missing or unreadable: {path}: {e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")  # LISA's fallback for a few files
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SampleError(f"{path}: malformed annotation (not JSON: {e})") from e


def _texts(anno: Any, where: str) -> list[Any]:
    """The annotation's texts as stored: only the one a sample uses must be a usable string
    (`_load_lisa`), so an empty text never rejects another."""
    if not isinstance(anno, dict):
        raise SampleError(f"{where}: malformed annotation (top level is not an object)")
    texts = anno.get("text")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise SampleError(f"{where}: malformed annotation ('text' must be a non-empty list, "
                          f"got {texts!r:.80})")
    return texts


def _usable(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _length_tag(is_sentence: Any) -> tuple[str, ...]:
    if isinstance(is_sentence, bool | np.bool_):
        return ("long",) if is_sentence else ("short",)
    return ()


class ReasonSegDataset:
    """ReasonSeg split as `Sample`s; tags "long"/"short" from `is_sentence`."""

    def __init__(self, root: str | Path, split: str = "val", queries: str = "first",
                 layout: str = "auto", data_files: str | list[str] | None = None,
                 cache_dir: str | Path | None = None, name: str | None = None) -> None:
        if split not in SPLITS:
            raise DatasetError(f"ReasonSeg has no split {split!r}; valid splits: "
                               f"{', '.join(SPLITS)}")
        check_choice("queries", queries, QUERY_POLICIES)
        check_choice("layout", layout, LAYOUTS)
        self.root = Path(root).expanduser()
        self.split = split
        self.queries = queries
        self.name = name or f"reasonseg_{split}"
        self._cache_dir = cache_dir
        if not self.root.is_dir():
            raise DatasetError(f"ReasonSeg folder not found: {self.root} ({ENV_HINT})")
        split_dir = self.root / split
        pq_files: list[Path] = []
        if layout in ("auto", "parquet") and not (layout == "auto" and split_dir.is_dir()):
            found = parquet.parquet_files(self.root, data_files)
            by_split = parquet.files_by_split(found, self.root, SPLITS)
            pq_files = found if data_files is not None else by_split.get(split, [])
            if not pq_files:
                have = sorted(p.name for p in self.root.iterdir() if p.is_dir())
                raise DatasetError(
                    f"ReasonSeg split {split!r} not found under {self.root}: no folder "
                    f"{split_dir} (LISA layout; subfolders here: {have}) and no parquet file "
                    f"for it (parquet splits found: {sorted(by_split)}) ({ENV_HINT})")
        elif not split_dir.is_dir():
            have = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise DatasetError(f"ReasonSeg split folder not found: {split_dir} (subfolders of "
                               f"{self.root}: {have}) ({ENV_HINT})")
        self.layout = "parquet" if pq_files else "lisa"
        self._files = pq_files
        self._split_dir = split_dir
        self._ids: list[str] | None = None
        self._index: dict[str, tuple[Any, int | None]] = {}
        self._ds: Any = None

    # ---------------------------------------------------------------- ids

    def sample_ids(self) -> list[str]:
        if self._ids is None:
            pairs = self._lisa_ids() if self.layout == "lisa" else self._parquet_ids()
            self._ids = [p[0] for p in pairs]
            self._index = {sid: (key, k) for sid, key, k in pairs}
        return list(self._ids)

    def _lisa_ids(self) -> list[tuple[str, Any, int | None]]:
        stems = sorted(p.name[:-len(IMAGE_SUFFIX)] for p in self._split_dir.iterdir()
                       if p.name.endswith(IMAGE_SUFFIX) and not p.name.startswith(".")
                       and len(p.name) > len(IMAGE_SUFFIX))
        out: list[tuple[str, Any, int | None]] = []
        for stem in stems:
            if self.queries == "first":
                out.append((stem, stem, 0))
                continue
            try:
                n = len(_texts(_read_json(self._split_dir / f"{stem}.json"), stem))
            except SampleError:
                n = 1  # load() reports what is wrong with this one
            out += [(f"{stem}#{k}", stem, k) for k in range(n)]
        return out

    def _dataset(self) -> Any:
        if self._ds is None:
            self._ds = parquet.load_parquet(self._files, self._cache_dir)
            missing = {"image", "text", "mask"} - set(self._ds.column_names)
            if missing:
                raise DatasetError(f"ReasonSeg parquet files {[str(f) for f in self._files]} "
                                   f"lack column(s) {sorted(missing)}; found "
                                   f"{self._ds.column_names}")
        return self._ds

    def _parquet_ids(self) -> list[tuple[str, Any, int | None]]:
        ds = self._dataset()
        n = len(ds)
        cols = ds.column_names
        image_ids = ([str(v) for v in ds["image_id"]] if "image_id" in cols
                     else [str(i) for i in range(n)])
        ann_ids = [str(v) for v in ds["ann_id"]] if "ann_id" in cols else [str(i) for i in range(n)]
        dup = Counter(image_ids)
        keys = [iid if dup[iid] == 1 else f"{iid}#{aid}" for iid, aid in zip(image_ids, ann_ids,
                                                                             strict=True)]
        texts = list(ds["text"])
        out: list[tuple[str, Any, int | None]] = []
        for row, (key, text) in enumerate(zip(keys, texts, strict=True)):
            if isinstance(text, list) and self.queries == "all":
                out += [(f"{key}#{k}", row, k) for k in range(max(len(text), 1))]
            else:
                out.append((key, row, 0))
        return out

    # ---------------------------------------------------------------- load

    def load(self, sample_id: str) -> Sample:
        try:
            return guarded_load(self.name, sample_id, self._load)
        except SampleError as e:
            if not e.tags:
                e.tags = self.tags_of(sample_id)
            raise

    def tags_of(self, sample_id: str) -> tuple[str, ...]:
        """The tags `sample_id` carries, from its annotation alone (no image): "long"/"short"
        from `is_sentence` where that is readable, else none."""
        if self._ids is None:
            self.sample_ids()
        if sample_id not in self._index:
            return ()
        key, _ = self._index[sample_id]
        try:
            if self.layout == "lisa":
                anno = _read_json(self._split_dir / f"{key}.json")
                return _length_tag(anno.get("is_sentence")) if isinstance(anno, dict) else ()
            ds = self._dataset()
            if "is_sentence" not in ds.column_names:
                return ()
            return _length_tag(ds.select_columns(["is_sentence"])[key]["is_sentence"])
        except Exception:  # whatever cannot be read gives no tag; load() says what is wrong
            return ()

    def _load(self, sample_id: str) -> Sample:
        if self._ids is None:
            self.sample_ids()
        if sample_id not in self._index:
            raise SampleError(f"{self.name}: unknown sample id {sample_id!r}")
        key, k = self._index[sample_id]
        if self.layout == "lisa":
            return self._load_lisa(sample_id, key, k or 0)
        return self._load_parquet(sample_id, key, k or 0)

    def _load_lisa(self, sample_id: str, stem: str, k: int) -> Sample:
        json_path = self._split_dir / f"{stem}.json"
        anno = _read_json(json_path)
        texts = _texts(anno, str(json_path))
        if k >= len(texts):
            raise SampleError(f"{json_path}: no text #{k} (has {len(texts)})")
        if not _usable(texts[k]):
            raise SampleError(f"{json_path}: malformed annotation: text #{k} is "
                              f"{texts[k]!r:.80}, not a non-empty string")
        image = images.read(self._split_dir / f"{stem}{IMAGE_SUFFIX}")
        try:
            gt = labelme_mask(anno.get("shapes"), image.shape[0], image.shape[1])
        except AnnotationError as e:
            raise SampleError(f"{json_path}: malformed annotation: {e}") from e
        return self._sample(sample_id, texts[k].strip(), image, gt,
                            _length_tag(anno.get("is_sentence")))

    def _load_parquet(self, sample_id: str, row: int, k: int) -> Sample:
        ds = self._dataset()
        what = f"{self.name}/{sample_id} (row {row} of {[f.name for f in self._files]})"
        rec = ds[row]
        text = rec.get("text")
        texts = text if isinstance(text, list) else [text]
        if k >= len(texts) or not isinstance(texts[k], str) or not texts[k].strip():
            raise SampleError(f"{what}: malformed row: no usable text #{k} in {text!r:.80}")
        image = parquet.image_cell(rec.get("image"), what, self.root)
        gt = parquet.mask_cell(ds.with_format("numpy", columns=["mask"])[row]["mask"], what)
        if gt.shape != image.shape[:2]:
            raise SampleError(f"{what}: mask shape {gt.shape} != image shape {image.shape[:2]}")
        h, w = rec.get("img_height"), rec.get("img_width")
        if h is not None and w is not None and (int(h), int(w)) != image.shape[:2]:
            raise SampleError(f"{what}: img_height/img_width {h}x{w} != decoded image "
                              f"{image.shape[0]}x{image.shape[1]}")
        return self._sample(sample_id, texts[k].strip(), image, gt,
                            _length_tag(rec.get("is_sentence")))

    def _sample(self, sample_id: str, query: str, image: np.ndarray, gt: np.ndarray,
                tags: tuple[str, ...]) -> Sample:
        box = masks.bbox(gt == 1)
        return Sample(sample_id=sample_id, query=query, image=image, gt=gt, dataset=self.name,
                      target_boxes=(box,) if box else (), tags=tags)

    def __len__(self) -> int:
        return len(self.sample_ids())

    def __repr__(self) -> str:
        return (f"ReasonSegDataset(root={str(self.root)!r}, split={self.split!r}, "
                f"layout={self.layout!r}, queries={self.queries!r})")
