"""A tiny, randomly initialised transformers `Sam3Model` and its processor, built offline.

Loaded by the SAM server subprocess of the torch tier as `--backend sam_tiny_hf:tiny_hf_backend`
and, with the same seed, in the test process to compute the expected masks; or saved to a folder
(`save_tiny_sam3`) that the real `--backend hf -o model=FOLDER` loads, tracker included. Its
sizes are all far from the defaults (hidden 32, image 224, 5 queries), so a part built with
default sizes cannot run. The tokenizer is CLIP's BPE from the copy inside `open_clip_torch`
(written out as vocab.json + merges.txt); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

IMAGE_SIZE = 224  # 16 x 14 px patches
REQUIREMENTS = ("torch", "torchvision", "transformers", "open_clip")
INSTALL = ("pip install torch==2.14.1 torchvision==0.29.1 'transformers>=5' open_clip_torch "
           "(or: pip install -e '.[sam3-hf]' after torch)")


def missing_requirements() -> list[str]:
    missing = [m for m in REQUIREMENTS if importlib.util.find_spec(m) is None]
    if not missing:
        import transformers

        if not hasattr(transformers, "Sam3Model"):
            missing.append(f"transformers>=5 with Sam3Model (have {transformers.__version__})")
    return missing


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def tokenizer_dir() -> str:
    """vocab.json + merges.txt of CLIP's tokenizer, from open_clip's bpe_simple_vocab_16e6."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations
    bpe = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(tempfile.mkdtemp(prefix="tiny_clip_tok_"))
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges)
                                    + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 32, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return str(out)


def tiny_config() -> Any:
    from transformers import Sam3Config
    from transformers.models.sam3.configuration_sam3 import (
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    vit = Sam3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, image_size=IMAGE_SIZE, patch_size=14,
                        window_size=8, global_attn_indexes=[0, 1])
    return Sam3Config(
        # four FPN levels as facebook/sam3 has: the tracker reads the 4x, 2x and 1x ones
        vision_config=Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=32,
                                       scale_factors=[4.0, 2.0, 1.0, 0.5]),
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                     "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 32, "hidden_act": "gelu"},
        geometry_encoder_config=Sam3GeometryEncoderConfig(hidden_size=32, num_layers=1,
                                                          num_attention_heads=4,
                                                          intermediate_size=64),
        detr_encoder_config=Sam3DETREncoderConfig(hidden_size=32, num_layers=1,
                                                  num_attention_heads=4, intermediate_size=64),
        detr_decoder_config=Sam3DETRDecoderConfig(hidden_size=32, num_layers=1, num_queries=5,
                                                  num_attention_heads=4, intermediate_size=64),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=2),
    )


def tiny_model_and_processor(seed: int = 0) -> tuple[Any, Any]:
    import torch
    import transformers
    from transformers import CLIPTokenizer, Sam3Model, Sam3Processor

    torch.manual_seed(seed)
    model = Sam3Model(tiny_config()).eval()
    # transformers 5.x: Sam3ImageProcessor (the "Fast" alias is deprecated, later removed)
    image_processor_cls = (getattr(transformers, "Sam3ImageProcessor", None)
                           or transformers.Sam3ImageProcessorFast)
    image_processor = image_processor_cls(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                          mask_size={"height": 56, "width": 56})
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir())
    processor = Sam3Processor(image_processor=image_processor, tokenizer=tokenizer,
                              target_size=IMAGE_SIZE)
    return model, processor


def tiny_hf_backend(seed: int = 0, threshold: float = 0.0, mask_threshold: float = 0.5) -> Any:
    """The server's `hf` backend over the tiny model (the factory the server is pointed at)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from servers.backends.sam3_hf import Sam3HFBackend

    model, processor = tiny_model_and_processor(seed)
    return Sam3HFBackend.from_components(model, processor, name="tiny-random-sam3",
                                         threshold=threshold, mask_threshold=mask_threshold)


def save_tiny_sam3(folder: str | os.PathLike, seed: int = 0) -> str:
    """The tiny Sam3Model and its processor saved as a `Sam3Model.save_pretrained` folder (no
    tracker config, no tracker weights: the hf backend derives the tracker from it)."""
    model, processor = tiny_model_and_processor(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
