"""Meta's `sam3` package behind the backend seam (GPU; `pip install -e '.[sam3]'`).

A prompt's parts decide its path (`routing.route`): text without points goes through
`Sam3Processor` (promptable concept segmentation: every instance of the phrase, a box as its
positive exemplar, each with sigmoid × presence score); points, or a box without text, go
through the SAM1-style interactive predictor (`model.predict_inst`; any text is not read
there), which needs the model built with `enable_inst_interactivity=True`. The image is encoded
once (`set_image`); each prompt runs on a shallow copy of that state, so the cached encoding is
never mutated by a prompt.

An image's prompts are batched as the hf backend batches them (`batching`; `-o max_batch`, 16):
concept prompts with the same exemplar shape (box or none) go through one `forward_grounding`
call, one find query per prompt (`FindStage` img_ids all 0, text_ids 0..n-1, as sam3 trains),
post-processed row by row as `Sam3Processor._forward_grounding` does; interactive prompts with
the same number of points, box presence and multimask go through one `predict_inst` call with
(n, k, 2) points and (n, 4) boxes, the predictor's multi-object mode. A prompt alone keeps the
`Sam3Processor` path above. UNTESTED ON A GPU: none was lent. Once, by hand, on CPU with random
weights (sam3 0.1.4 in a private venv, its three CUDA-only spots, two `device="cuda"`
constructors and a `pin_memory`, patched to CPU), 6 concept prompts (text, text + box, a
duplicate) and 6 interactive ones (box, click, box + 2 points; multimask on and off) matched
`max_batch=1`: same instance counts, scores within 1.5e-7, mask IoU >= 0.99999. The GPU tier
(tests/servers/test_sam_server_gpu.py) compares the two; `-o max_batch=1` restores one prompt
per pass. A batch that raises reruns its prompts one by one.

Written against facebookresearch/sam3 (sam3/model/sam3_image_processor.py, sam3_image.py,
model_builder.py, sam1_task_predictor.py); it cannot run without a GPU and the gated
`facebook/sam3` weights.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from rescue.hypothesis import Prompt
from servers.backends.base import (
    BackendInfo,
    Instance,
    PromptResult,
    SegmentOptions,
    best_first,
    instance_from_mask,
)
from servers.backends.batching import is_oom, run_batched
from servers.backends.routing import ROUTING, route
from servers.backends.versions import package_version

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def find_bpe_file(explicit: str | None = None) -> str:
    """The CLIP BPE vocabulary: `explicit`, else the copy inside `sam3`, else `open_clip`'s.

    The sam3 wheel (0.1.4) ships without its assets; open_clip_torch ships the same file.
    """
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"bpe_path {explicit} does not exist")
        return explicit
    for pkg, rel in (("sam3", os.path.join("assets", BPE_NAME)),
                     ("sam3", os.path.join("..", "assets", BPE_NAME)),
                     ("open_clip", BPE_NAME)):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            path = os.path.normpath(os.path.join(root, rel))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{BPE_NAME} not found in sam3 or open_clip; pip install "
                            f"open_clip_torch or pass -o bpe_path=/path/to/{BPE_NAME}")


LEFT_TO_CHECKPOINT = ("language_backbone.encoder.positional_embedding",
                      "language_backbone.encoder.text_projection")
"""sam3 allocates these with torch.empty and relies on the checkpoint to fill them; with random
weights they hold garbage (NaN on a GPU: every text/concept output became NaN)."""


def _init_left_to_checkpoint(model: Any, torch: Any) -> None:
    """Random-weights mode (tests, smoke runs): give uninitialised tensors small values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(LEFT_TO_CHECKPOINT) or not torch.isfinite(p).all():
                torch.nn.init.normal_(p, std=0.02)


@dataclass
class Sam3State:
    processor_state: dict
    height: int
    width: int


class Sam3MetaBackend:
    name = "sam3"

    def __init__(self, checkpoint: str | None = None, load_from_hf: bool = True,
                 bpe_path: str | None = None, device: str = "cuda", resolution: int = 1008,
                 confidence_threshold: float = 0.5, enable_points: bool = True,
                 dtype: str = "bfloat16", compile: bool = False, max_batch: int = 16) -> None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError("dtype is bfloat16, float16 or float32")
        if int(max_batch) < 1:
            raise ValueError("max_batch is at least 1 (1: every prompt in a pass of its own)")
        self.max_batch = int(max_batch)  # prompts per forward pass; not in the identity
        self.checkpoint = checkpoint
        self.load_from_hf = bool(load_from_hf)
        self.bpe_path = bpe_path
        self.device = device
        self.resolution = int(resolution)
        self.confidence_threshold = float(confidence_threshold)
        self.enable_points = bool(enable_points)
        self.dtype = dtype
        self.compile = bool(compile)
        self._model: Any = None
        self._processor: Any = None
        self._torch: Any = None
        # from package metadata, not from the loaded module: /v1/info's identity is the same
        # before and after loading, so a client's cache keys do not change under it
        self._version = package_version("sam3")
        # one GPU, one model: prompts and encodes run one at a time; predict_inst also keeps
        # per-call features on the predictor object, which is not safe to share across threads
        self._lock = threading.Lock()

    def load(self) -> None:
        if self._model is not None:
            return
        try:
            import torch
            from sam3.model.sam3_image_processor import Sam3Processor
            from sam3.model_builder import build_sam3_image_model
        except ImportError as exc:
            raise ImportError(f"the sam3 backend needs torch and Meta's sam3 package: install "
                              f"torch for your platform, then pip install -e '.[sam3]' ({exc})"
                              ) from exc
        self._torch = torch
        model = build_sam3_image_model(
            bpe_path=find_bpe_file(self.bpe_path), device=self.device, eval_mode=True,
            checkpoint_path=self.checkpoint,
            load_from_HF=self.load_from_hf and self.checkpoint is None,
            enable_segmentation=True, enable_inst_interactivity=self.enable_points,
            compile=self.compile)
        if self.checkpoint is None and not self.load_from_hf:
            _init_left_to_checkpoint(model, torch)
        self._processor = Sam3Processor(model, resolution=self.resolution, device=self.device,
                                        confidence_threshold=self.confidence_threshold)
        self._model = model

    def info(self) -> BackendInfo:
        return BackendInfo(
            backend=self.name, model="facebook/sam3" if self.checkpoint is None else
            os.path.basename(self.checkpoint),
            backend_version=f"sam3 {self._version}", device=self.device,
            # text: concept prompts (a box rides along as the exemplar); box and points:
            # interactive prompts, which need the predictor
            capabilities={"text": True, "box": self.enable_points, "points": self.enable_points,
                          "multimask": self.enable_points},
            identity={"backend": self.name, "checkpoint": self.checkpoint or "facebook/sam3",
                      "resolution": self.resolution,
                      "confidence_threshold": self.confidence_threshold,
                      "routing": ROUTING, "enable_points": self.enable_points,
                      "dtype": self.dtype, "sam3": self._version})

    def _autocast(self) -> Any:
        torch = self._torch
        if self.dtype == "float32" or not str(self.device).startswith("cuda"):
            return nullcontext()
        return torch.autocast("cuda", dtype=getattr(torch, self.dtype))

    def encode(self, image: np.ndarray) -> Sam3State:
        from PIL import Image

        self.load()
        # a PIL image: set_image reads (H, W) from .size; from an ndarray it would take the
        # last two axes, wrong for (H, W, 3)
        pil = Image.fromarray(np.ascontiguousarray(image), "RGB")
        with self._lock, self._torch.inference_mode(), self._autocast():
            st = self._processor.set_image(pil)
        return Sam3State(processor_state=st, height=int(image.shape[0]),
                         width=int(image.shape[1]))

    def segment(self, state: Sam3State, prompts: Sequence[Prompt],
                options: SegmentOptions) -> list[PromptResult]:
        self.load()
        with self._lock, self._torch.inference_mode(), self._autocast():
            return run_batched(list(prompts), lambda p: self.batch_key(p, options),
                               self.max_batch, lambda group: self._batch(state, group, options),
                               lambda p: self._safe_one(state, p, options))

    def batch_key(self, p: Prompt, options: SegmentOptions) -> tuple:
        """Prompts with the same key share one forward pass (same head, same input shapes)."""
        if route(p) == "concept":
            return ("concept", p.box is not None)
        return ("interactive", len(p.points), p.box is not None, _multimask(p, options))

    def _batch(self, state: Sam3State, group: list[Prompt], options: SegmentOptions
               ) -> list[PromptResult]:
        if route(group[0]) == "concept":
            return self._concept_batch(state, group, options)
        if not self.enable_points:
            return [self._one(state, p, options) for p in group]
        return self._interactive_batch(state, group, options)

    def _safe_one(self, state: Sam3State, p: Prompt, options: SegmentOptions) -> PromptResult:
        try:  # one prompt's failure is that prompt's error
            return self._one(state, p, options)
        except Exception as exc:
            if is_oom(exc):
                raise
            return PromptResult.failed(f"sam3 failed: {type(exc).__name__}: {exc}")

    def _one(self, state: Sam3State, p: Prompt, options: SegmentOptions) -> PromptResult:
        if route(p) == "interactive":
            if not self.enable_points:
                return PromptResult.failed("interactive prompts (points, or a box without text) "
                                           "need the predictor: start the sam3 backend with "
                                           "-o enable_points=true")
            return self._interactive(state, p, options)
        return self._concept(state, p, options)

    def _fresh(self, state: Sam3State) -> dict:
        # shallow copies: set_text_prompt updates backbone_out and the prompt lives in the
        # state; the cached encoding (the tensors) is shared, never written
        st = dict(state.processor_state)
        st["backbone_out"] = dict(st["backbone_out"])
        for key in ("geometric_prompt", "boxes", "masks", "masks_logits", "scores"):
            st.pop(key, None)
        for key in ("language_features", "language_mask", "language_embeds"):
            st["backbone_out"].pop(key, None)
        return st

    def _concept(self, state: Sam3State, p: Prompt, options: SegmentOptions) -> PromptResult:
        proc = self._processor
        st = self._fresh(state)
        assert p.text is not None  # route(): concept prompts carry text
        if p.box is None:
            st = proc.set_text_prompt(prompt=p.text, state=st)
        else:
            # text features first, then one grounding pass with text and box together
            # (set_text_prompt would run a grounding pass of its own)
            st["backbone_out"].update(
                self._model.backbone.forward_text([p.text], device=self.device))
            st = proc.add_geometric_prompt(box=_cxcywh(p.box, state), label=True, state=st)
        return self._found(st["scores"], st["masks"], options)

    def _found(self, scores_t: Any, masks_t: Any, options: SegmentOptions) -> PromptResult:
        """Kept queries' scores (k,) and masks (k, 1, H, W) -> the best max_instances."""
        scores = scores_t.float().cpu().numpy().reshape(-1)
        if scores.size == 0:
            return PromptResult(instances=[])
        order = np.argsort(-scores)[: options.max_instances]
        idx = self._torch.as_tensor(order, dtype=self._torch.long, device=masks_t.device)
        masks = masks_t[idx].squeeze(1).cpu().numpy().astype(bool)
        return PromptResult(instances=best_first(
            [instance_from_mask(m, float(s)) for m, s in zip(masks, scores[order], strict=True)],
            options.max_instances))

    def _concept_batch(self, state: Sam3State, group: list[Prompt], options: SegmentOptions
                       ) -> list[PromptResult]:
        """n concept prompts in one grounding pass: n find queries on image 0, query i reading
        phrase i and (with boxes) exemplar i; rows post-processed as `_forward_grounding`."""
        if len(group) == 1:
            return [self._concept(state, group[0], options)]
        from sam3.model.data_misc import FindStage, interpolate

        torch, n, dev = self._torch, len(group), self.device
        st = self._fresh(state)
        st["backbone_out"].update(
            self._model.backbone.forward_text([p.text for p in group], device=dev))
        geometric = self._model._get_dummy_prompt(num_prompts=n)
        if group[0].box is not None:  # (1 box, n queries, cxcywh), as add_geometric_prompt
            boxes = torch.tensor([_cxcywh(p.box, state) for p in group],  # type: ignore[arg-type]
                                 device=dev, dtype=torch.float32).view(1, n, 4)
            geometric.append_boxes(boxes, torch.ones((1, n), device=dev, dtype=torch.bool))
        find = FindStage(img_ids=torch.zeros(n, device=dev, dtype=torch.long),
                         text_ids=torch.arange(n, device=dev, dtype=torch.long),
                         input_boxes=None, input_boxes_mask=None, input_boxes_label=None,
                         input_points=None, input_points_mask=None)
        out = self._model.forward_grounding(backbone_out=st["backbone_out"], find_input=find,
                                            geometric_prompt=geometric, find_target=None)
        probs = out["pred_logits"].sigmoid() * out["presence_logit_dec"].sigmoid().unsqueeze(1)
        probs = probs.squeeze(-1)  # (n, queries)
        results = []
        for i in range(n):
            keep = probs[i] > self.confidence_threshold
            masks = interpolate(out["pred_masks"][i][keep].unsqueeze(1),
                                (state.height, state.width), mode="bilinear",
                                align_corners=False).sigmoid() > 0.5
            results.append(self._found(probs[i][keep], masks, options))
        return results

    def _interactive(self, state: Sam3State, p: Prompt, options: SegmentOptions
                     ) -> PromptResult:
        coords = np.asarray(p.points, dtype=np.float32).reshape(-1, 2) if p.points else None
        labels = np.asarray(p.point_labels, dtype=np.int32) if p.points else None
        box = np.asarray(p.box, dtype=np.float32) if p.box is not None else None
        masks, scores, _ = self._model.predict_inst(
            state.processor_state, point_coords=coords, point_labels=labels, box=box,
            multimask_output=_multimask(p, options))
        masks = np.asarray(masks).reshape(-1, state.height, state.width) > 0
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        insts: list[Instance] = [instance_from_mask(m, float(s))
                                 for m, s in zip(masks, scores, strict=True)]
        limit = options.max_instances if options.multimask else 1
        return PromptResult(instances=best_first(insts, limit))

    def _interactive_batch(self, state: Sam3State, group: list[Prompt], options: SegmentOptions
                           ) -> list[PromptResult]:
        """n interactive prompts of one shape in one `predict_inst` call: (n, k, 2) points,
        (n, k) labels, (n, 4) boxes, the predictor's multi-object mode; masks (n, C, H, W)."""
        if len(group) == 1:
            return [self._interactive(state, group[0], options)]
        n, first = len(group), group[0]
        kw: dict[str, Any] = {}
        if first.points:
            kw["point_coords"] = np.asarray([p.points for p in group], dtype=np.float32
                                            ).reshape(n, -1, 2)
            kw["point_labels"] = np.asarray([p.point_labels for p in group], dtype=np.int32
                                            ).reshape(n, -1)
        if first.box is not None:
            kw["box"] = np.asarray([p.box for p in group], dtype=np.float32).reshape(n, 4)
        masks, scores, _ = self._model.predict_inst(
            state.processor_state, multimask_output=_multimask(first, options), **kw)
        masks = np.asarray(masks).reshape(n, -1, state.height, state.width) > 0
        scores = np.asarray(scores, dtype=np.float64).reshape(n, -1)
        limit = options.max_instances if options.multimask else 1
        return [PromptResult(instances=best_first(
                    [instance_from_mask(m, float(s)) for m, s in zip(ms, ss, strict=True)],
                    limit)) for ms, ss in zip(masks, scores, strict=True)]


def _multimask(p: Prompt, options: SegmentOptions) -> bool:
    """One click is ambiguous: ask for SAM's three masks and keep the best (SAM's advice);
    several prompts together are not, one mask is better there."""
    return bool(options.multimask or (p.box is None and len(p.points) == 1))


def _cxcywh(box: tuple[float, float, float, float], state: Sam3State) -> list[float]:
    """A pixel xyxy box as sam3's geometric prompts take it: cx, cy, w, h in [0, 1]."""
    x1, y1, x2, y2 = box
    w, h = state.width, state.height
    return [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
