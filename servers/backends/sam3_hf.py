"""transformers' SAM3 behind the backend seam (`pip install -e '.[sam3-hf]'`, transformers >= 5).

Text and box prompts: `Sam3Model` (promptable concept segmentation). The image is encoded once
with `get_vision_features`; every prompt reuses those features (`vision_embeds=`), so only the
text encoder and the DETR-style heads run per prompt. Point prompts: `Sam3TrackerModel` (the
SAM2-style interactive API); its image embeddings are computed on the first point prompt of an
image and kept in the same cached state.

Runs on CPU with tiny random weights (the `torch` test tier) and on a GPU with `facebook/sam3`.
"""

from __future__ import annotations

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
                 local_files_only: bool = False) -> None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError("dtype is bfloat16, float16 or float32")
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
        self._version = "not loaded"
        self._lock = threading.Lock()

    @classmethod
    def from_components(cls, model: Any, processor: Any, tracker: Any = None,
                        tracker_processor: Any = None, name: str = "in-memory", **kwargs: Any
                        ) -> Sam3HFBackend:
        """A backend over already-built objects (a tiny random model in tests, a fine-tune)."""
        self = cls(model=name, enable_points=tracker is not None, **kwargs)
        import torch
        import transformers

        self._torch = torch
        self._version = transformers.__version__
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
        self._version = transformers.__version__
        kw = {"revision": self.revision, "local_files_only": self.local_files_only}
        dtype = getattr(torch, self.dtype)
        self._model = Sam3Model.from_pretrained(self.model_id, dtype=dtype, **kw
                                                ).to(self.device).eval()
        self._processor = Sam3Processor.from_pretrained(self.model_id, **kw)
        if self.enable_points:
            from transformers import Sam3TrackerModel, Sam3TrackerProcessor

            self._tracker = Sam3TrackerModel.from_pretrained(self.model_id, dtype=dtype, **kw
                                                             ).to(self.device).eval()
            self._tracker_processor = Sam3TrackerProcessor.from_pretrained(self.model_id, **kw)

    def info(self) -> BackendInfo:
        return BackendInfo(
            backend=self.name, model=self.model_id,
            backend_version=f"transformers {self._version}", device=self.device,
            capabilities={"text": True, "box": True, "points": self.enable_points,
                          "multimask": self.enable_points},
            identity={"backend": self.name, "model": self.model_id, "revision": self.revision,
                      "dtype": self.dtype, "threshold": self.threshold,
                      "mask_threshold": self.mask_threshold, "enable_points": self.enable_points,
                      "transformers": self._version})

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
        out = []
        with self._lock, self._torch.inference_mode():
            for p in prompts:
                try:
                    if p.points:
                        out.append(self._interactive(state, p, options))
                    else:
                        out.append(self._concept(state, p, options))
                except Exception as exc:
                    if "out of memory" in str(exc).lower():
                        raise
                    out.append(PromptResult.failed(f"hf sam3 failed: {type(exc).__name__}: "
                                                   f"{exc}"))
        return out

    def _concept(self, state: HFState, p: Prompt, options: SegmentOptions) -> PromptResult:
        kw: dict[str, Any] = {"original_sizes": [[state.height, state.width]],
                              "return_tensors": "pt"}
        if p.text is not None:
            kw["text"] = p.text
        if p.box is not None:  # text None + box: the processor uses the text "visual"
            kw["input_boxes"] = [[list(p.box)]]
            kw["input_boxes_labels"] = [[1]]
        inputs = self._to_device(self._processor(**kw))
        model_kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "input_boxes",
                                           "input_boxes_labels") if k in inputs}
        outputs = self._model(vision_embeds=state.vision_embeds, **model_kw)
        res = self._processor.post_process_instance_segmentation(
            outputs, threshold=self.threshold, mask_threshold=self.mask_threshold,
            target_sizes=[[state.height, state.width]])[0]
        scores = res["scores"].float().cpu().numpy().reshape(-1)
        if scores.size == 0:
            return PromptResult(instances=[])
        masks = res["masks"].float().cpu().numpy().reshape(-1, state.height, state.width) > 0.5
        return PromptResult(instances=best_first(
            [instance_from_mask(m, float(s)) for m, s in zip(masks, scores, strict=True)],
            options.max_instances))

    def _interactive(self, state: HFState, p: Prompt, options: SegmentOptions) -> PromptResult:
        if self._tracker is None:
            return PromptResult.failed("point prompts need Sam3TrackerModel: start the hf "
                                       "backend with -o enable_points=true")
        proc = self._tracker_processor
        if state.tracker_embeds is None:  # once per image, kept with the cached state
            pix = self._to_device(proc(images=state.pil, return_tensors="pt"))
            state.tracker_embeds = self._tracker.get_image_embeddings(pix["pixel_values"])
        kw: dict[str, Any] = {
            "original_sizes": [[state.height, state.width]], "return_tensors": "pt",
            "input_points": [[[list(pt) for pt in p.points]]],
            "input_labels": [[list(p.point_labels)]]}
        if p.box is not None:
            kw["input_boxes"] = [[list(p.box)]]
        inputs = self._to_device(proc(**kw))
        ambiguous = p.box is None and len(p.points) == 1
        outputs = self._tracker(
            image_embeddings=state.tracker_embeds,
            **{k: inputs[k] for k in ("input_points", "input_labels", "input_boxes")
               if k in inputs},
            multimask_output=bool(options.multimask or ambiguous))
        masks = proc.post_process_masks(outputs.pred_masks.cpu(),
                                        [[state.height, state.width]])[0]
        masks = masks.float().numpy().reshape(-1, state.height, state.width) > 0.5
        scores = outputs.iou_scores.float().cpu().numpy().reshape(-1)
        insts = [instance_from_mask(m, float(s)) for m, s in zip(masks, scores, strict=True)]
        return PromptResult(instances=best_first(insts, options.max_instances
                                                 if options.multimask else 1))
