"""transformers' SAM3 behind the backend seam (`pip install -e '.[sam3-hf]'`, transformers >= 5).

A prompt's parts decide its path (`routing.route`), as in the sam3 backend: text without points
is a concept prompt for `Sam3Model` (promptable concept segmentation; a box is a positive
exemplar of the phrase); points, or a box without text, make an interactive prompt for
`Sam3TrackerModel` (the SAM2-style API; any text is not read there). The image is encoded once
with `get_vision_features`; every concept prompt reuses those features (`vision_embeds=`). The
tracker's image embeddings are computed on the first interactive prompt of an image and kept in
the same cached state.

An image's prompts run in as few forward passes as the two models allow (`batching`): concept
prompts with and without an exemplar box are two batches through the grounding head (phrases
padded to 32 tokens, the vision features broadcast to the batch); interactive prompts are one
tracker call per (number of points, box or not, multimask), the prompts on the point-batch axis.
Prompts are never padded to share a pass, since a padded box or point changes the answer. At
most `max_batch` prompts go in one pass; each prompt gets the answer it gets alone (raw logits
agree to ~1e-9 on CPU, masks and scores are the same: tests/servers/test_sam_server_torch.py).

The tracker is built with the sizes of the checkpoint: a `facebook/sam3` folder (a Sam3Video
config) carries its own tracker config; a folder saved from a `Sam3Model` does not, and
`Sam3TrackerModel.from_pretrained` would apply the default decoder sizes (every point prompt
failed on a model of other sizes), so `tracker_config` derives one from its vision config.

Runs on CPU with tiny random weights (the `torch` test tier) and on a GPU with `facebook/sam3`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rescue.hypothesis import Prompt
from servers.backends.base import (
    BackendInfo,
    PromptResult,
    SegmentOptions,
    best_first,
    instance_from_mask,
)
from servers.backends.batching import is_oom, run_batched
from servers.backends.routing import ROUTING, route
from servers.backends.versions import package_version

log = logging.getLogger(__name__)

TRACKER_SCALES = (4.0, 2.0, 1.0)
"""The tracker reads three FPN levels: 4x and 2x (high-resolution features), then 1x (the image
embedding, at image_size / patch_size)."""


def tracker_config(config: Any) -> Any:
    """A `Sam3TrackerConfig` with the sizes of a saved SAM3 config: its own `tracker_config`
    (a Sam3Video folder such as facebook/sam3), else one derived from a Sam3Model's vision
    config (prompt encoder and mask decoder at its FPN width, image and patch size, feature
    sizes from its scale factors)."""
    from transformers import Sam3TrackerConfig

    own = getattr(config, "tracker_config", None)
    if own is not None:
        return own if isinstance(own, Sam3TrackerConfig) else Sam3TrackerConfig(**dict(own))
    config = getattr(config, "detector_config", None) or config
    vision = config.vision_config
    backbone = vision.backbone_config
    image, patch = int(backbone.image_size), int(backbone.patch_size)
    scales = tuple(float(f) for f in vision.scale_factors)
    if scales[:3] != TRACKER_SCALES:
        raise ValueError(f"the tracker needs vision scale_factors starting {list(TRACKER_SCALES)}"
                         f"; this Sam3Model has {list(scales)}: start with -o enable_points=false")
    grid = image // patch
    vision_dict = vision.to_dict()
    vision_dict["backbone_feature_sizes"] = [[int(grid * f)] * 2 for f in TRACKER_SCALES]
    hidden = int(vision.fpn_hidden_size)
    return Sam3TrackerConfig(
        vision_config=vision_dict,
        prompt_encoder_config={"hidden_size": hidden, "image_size": image, "patch_size": patch},
        mask_decoder_config={"hidden_size": hidden, "iou_head_hidden_dim": hidden})


@dataclass
class HFState:
    height: int
    width: int
    pil: Any
    vision_embeds: Any
    tracker_embeds: Any = None


class Sam3HFBackend:
    name = "hf"

    def __init__(self, model: str = "facebook/sam3", device: str = "cpu",
                 dtype: str = "float32", threshold: float = 0.5, mask_threshold: float = 0.5,
                 enable_points: bool = True, revision: str | None = None,
                 local_files_only: bool = False, max_batch: int = 16) -> None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError("dtype is bfloat16, float16 or float32")
        if int(max_batch) < 1:
            raise ValueError("max_batch is at least 1 (1: every prompt in a pass of its own)")
        # prompts per forward pass; not in the identity: a batch gives each prompt the
        # answer it gets alone (tests/servers/test_sam_server_torch.py)
        self.max_batch = int(max_batch)
        self.model_id = model
        self.device = device
        self.dtype = dtype
        self.threshold = float(threshold)
        self.mask_threshold = float(mask_threshold)
        self.enable_points = bool(enable_points)
        self.revision = revision
        self.local_files_only = bool(local_files_only)
        self._model: Any = None
        self._processor: Any = None
        self._tracker: Any = None
        self._tracker_processor: Any = None
        self._torch: Any = None
        # from package metadata, not from the loaded module: /v1/info's identity is the same
        # before and after loading, so a client's cache keys do not change under it
        self._version = package_version("transformers")
        self._lock = threading.Lock()

    @classmethod
    def from_components(cls, model: Any, processor: Any, tracker: Any = None,
                        tracker_processor: Any = None, name: str = "in-memory", **kwargs: Any
                        ) -> Sam3HFBackend:
        """A backend over already-built objects (a tiny random model in tests, a fine-tune)."""
        self = cls(model=name, enable_points=tracker is not None, **kwargs)
        import torch

        self._torch = torch
        self._model = model.to(self.device).eval()
        self._processor = processor
        if tracker is not None:
            self._tracker = tracker.to(self.device).eval()
            self._tracker_processor = tracker_processor
        return self

    def load(self) -> None:
        if self._model is not None:
            return
        try:
            import torch
            import transformers
            from transformers import Sam3Model, Sam3Processor
        except ImportError as exc:
            raise ImportError(f"the hf backend needs torch, torchvision and transformers>=5: "
                              f"pip install -e '.[sam3-hf]' ({exc})") from exc
        self._torch = torch
        if transformers.__version__ != self._version:
            raise RuntimeError(f"transformers {transformers.__version__} imported, but its "
                               f"package metadata says {self._version}: reinstall it")
        kw = {"revision": self.revision, "local_files_only": self.local_files_only}
        dtype = getattr(torch, self.dtype)
        self._model = Sam3Model.from_pretrained(self.model_id, dtype=dtype, **kw
                                                ).to(self.device).eval()
        self._processor = Sam3Processor.from_pretrained(self.model_id, **kw)
        if self.enable_points:
            from transformers import AutoConfig, Sam3TrackerModel, Sam3TrackerProcessor

            config = tracker_config(AutoConfig.from_pretrained(self.model_id, **kw))
            tracker, loading = Sam3TrackerModel.from_pretrained(
                self.model_id, config=config, dtype=dtype, output_loading_info=True, **kw)
            untrained = sorted({k.split(".")[0] for k in loading.get("missing_keys", ())
                                if k.startswith(("prompt_encoder.", "mask_decoder."))})
            if untrained:
                log.warning("%s holds no tracker weights for %s: interactive prompts run on "
                            "random ones", self.model_id, ", ".join(untrained))
            self._tracker = tracker.to(self.device).eval()
            self._tracker_processor = Sam3TrackerProcessor.from_pretrained(self.model_id, **kw)

    def info(self) -> BackendInfo:
        return BackendInfo(
            backend=self.name, model=self.model_id,
            backend_version=f"transformers {self._version}", device=self.device,
            # text: concept prompts (a box rides along as the exemplar); box and points:
            # interactive prompts, which need the tracker
            capabilities={"text": True, "box": self.enable_points, "points": self.enable_points,
                          "multimask": self.enable_points},
            identity={"backend": self.name, "model": self.model_id, "revision": self.revision,
                      "dtype": self.dtype, "threshold": self.threshold,
                      "mask_threshold": self.mask_threshold, "enable_points": self.enable_points,
                      "routing": ROUTING, "transformers": self._version})

    def _to_device(self, batch: Any) -> dict:
        torch = self._torch
        dtype = getattr(torch, self.dtype)
        out = {}
        for k, v in dict(batch).items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point() and k == "pixel_values":
                    v = v.to(dtype)
            out[k] = v
        return out

    def encode(self, image: np.ndarray) -> HFState:
        from PIL import Image

        self.load()
        pil = Image.fromarray(np.ascontiguousarray(image), "RGB")
        with self._lock, self._torch.inference_mode():
            inputs = self._to_device(self._processor(images=pil, return_tensors="pt"))
            vision = self._model.get_vision_features(pixel_values=inputs["pixel_values"])
        return HFState(height=int(image.shape[0]), width=int(image.shape[1]), pil=pil,
                       vision_embeds=vision)

    def segment(self, state: HFState, prompts: Sequence[Prompt],
                options: SegmentOptions) -> list[PromptResult]:
        self.load()
        with self._lock, self._torch.inference_mode():
            return run_batched(list(prompts), lambda p: self.batch_key(p, options),
                               self.max_batch, lambda group: self._batch(state, group, options),
                               lambda p: self._one(state, p, options))

    def batch_key(self, p: Prompt, options: SegmentOptions) -> tuple:
        """Prompts with the same key share one forward pass: the same head and the same input
        shapes, so no prompt is padded (a padded box or point would change its answer)."""
        if route(p) == "concept":
            return ("concept", p.box is not None)
        return ("interactive", len(p.points), p.box is not None, self._multimask(p, options))

    def _batch(self, state: HFState, group: list[Prompt], options: SegmentOptions
               ) -> list[PromptResult]:
        if route(group[0]) == "concept":
            return self._concept(state, group, options)
        return self._interactive(state, group, options)

    def _one(self, state: HFState, p: Prompt, options: SegmentOptions) -> PromptResult:
        try:
            return self._batch(state, [p], options)[0]
        except Exception as exc:
            if is_oom(exc):
                raise
            return PromptResult.failed(f"hf sam3 failed: {type(exc).__name__}: {exc}")

    def _concept(self, state: HFState, group: list[Prompt], options: SegmentOptions
                 ) -> list[PromptResult]:
        """Sam3Model over one image encoding: every phrase padded to the tokenizer's 32 tokens,
        the vision features broadcast to the batch (views, not copies); with boxes, one
        positive exemplar each."""
        n, size = len(group), [state.height, state.width]
        # one original size per prompt: the processor normalises the boxes of each batch row
        # by its own entry, and would leave rows past the list unnormalised
        kw: dict[str, Any] = {"text": [p.text for p in group], "original_sizes": [size] * n,
                              "return_tensors": "pt"}
        if group[0].box is not None:  # the box is a positive exemplar of the phrase
            kw["input_boxes"] = [[list(p.box)] for p in group]  # type: ignore[arg-type]
            kw["input_boxes_labels"] = [[1]] * n
        inputs = self._to_device(self._processor(**kw))
        model_kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "input_boxes",
                                           "input_boxes_labels") if k in inputs}
        outputs = self._model(vision_embeds=broadcast_batch(state.vision_embeds, n), **model_kw)
        probs = outputs.pred_logits.sigmoid()  # (n, queries), as the processor scores them
        if outputs.presence_logits is not None:
            probs = probs * outputs.presence_logits.sigmoid()
        return [self._best_queries(probs[i], outputs.pred_masks[i], size, options)
                for i in range(n)]

    def _best_queries(self, probs: Any, logits: Any, size: list[int], options: SegmentOptions
                      ) -> PromptResult:
        """`post_process_instance_segmentation` for one prompt, on the queries kept: those
        over the threshold, best first, at most max_instances. The processor upsamples every
        query and holds the masks as int64 (0.8 GB for 64 prompts at 640x480) before all but
        max_instances are dropped; the arithmetic (sigmoid, bilinear upsampling, threshold) is
        its own, so the masks are the same."""
        torch = self._torch
        keep = torch.nonzero(probs > self.threshold).flatten()
        if keep.numel() == 0:
            return PromptResult(instances=[])
        order = keep[torch.argsort(-probs[keep], stable=True)][:max(0, options.max_instances)]
        masks = torch.nn.functional.interpolate(
            logits[order].sigmoid().unsqueeze(0), size=size, mode="bilinear",
            align_corners=False).squeeze(0) > self.mask_threshold
        scores = probs[order].float().cpu().numpy()
        return PromptResult(instances=best_first(
            [instance_from_mask(m, float(v)) for m, v in
             zip(masks.cpu().numpy(), scores, strict=True)], options.max_instances))

    @staticmethod
    def _multimask(p: Prompt, options: SegmentOptions) -> bool:
        # one click is ambiguous: SAM's three masks, the best kept
        return bool(options.multimask or (p.box is None and len(p.points) == 1))

    def _interactive(self, state: HFState, group: list[Prompt], options: SegmentOptions
                     ) -> list[PromptResult]:
        """Sam3TrackerModel: the prompts of one image are its objects (the point-batch axis),
        decoded together against the image embeddings computed once per image."""
        if self._tracker is None:
            return [PromptResult.failed("interactive prompts (points, or a box without text) "
                                        "need Sam3TrackerModel: start the hf backend with "
                                        "-o enable_points=true")] * len(group)
        proc = self._tracker_processor
        size = [state.height, state.width]
        if state.tracker_embeds is None:  # once per image, kept with the cached state
            pix = self._to_device(proc(images=state.pil, return_tensors="pt"))
            state.tracker_embeds = self._tracker.get_image_embeddings(pix["pixel_values"])
        kw: dict[str, Any] = {"original_sizes": [size], "return_tensors": "pt"}
        if group[0].points:
            kw["input_points"] = [[[list(pt) for pt in p.points] for p in group]]
            kw["input_labels"] = [[list(p.point_labels) for p in group]]
        if group[0].box is not None:
            kw["input_boxes"] = [[list(p.box) for p in group]]  # type: ignore[arg-type]
        inputs = self._to_device(proc(**kw))
        outputs = self._tracker(
            image_embeddings=state.tracker_embeds,
            **{k: inputs[k] for k in ("input_points", "input_labels", "input_boxes")
               if k in inputs},
            multimask_output=self._multimask(group[0], options))
        # (1, n, masks, h, w) and (1, n, masks)
        logits, scores = outputs.pred_masks, outputs.iou_scores
        limit = options.max_instances if options.multimask else 1
        if limit == 1 and logits.shape[2] > 1:  # upsample only the mask that is kept
            best = scores.argmax(dim=2, keepdim=True)  # the first best, as best_first keeps
            scores = scores.gather(2, best)
            logits = logits.gather(2, best[..., None, None].expand(-1, -1, -1,
                                                                   *logits.shape[-2:]))
        masks = proc.post_process_masks(logits.cpu(), [size])[0]
        masks = masks.float().numpy().reshape(len(group), -1, *size) > 0.5
        scores = scores.float().cpu().numpy().reshape(len(group), -1)
        return [PromptResult(instances=best_first(
                    [instance_from_mask(m, float(s)) for m, s in zip(ms, ss, strict=True)],
                    limit)) for ms, ss in zip(masks, scores, strict=True)]


def broadcast_batch(output: Any, n: int) -> Any:
    """A copy of a transformers ModelOutput whose batch-1 tensors (also inside tuples) are
    expanded to batch n: views of the cached image features, no memory per prompt."""
    if n == 1:
        return output

    def grow(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return type(v)(grow(x) for x in v)
        if hasattr(v, "expand") and getattr(v, "ndim", 0) >= 1 and v.shape[0] == 1:
            return v.expand(n, *v.shape[1:])
        return v

    return type(output)(**{k: grow(v) for k, v in output.items()})
