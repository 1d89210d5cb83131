"""Serve the stand-in over synthetic scenes, for benchmarks and manual runs:

    cd tests && python -m standin --port 8002 --num-samples 24 --seed 0

It serves a grounding planner and a yes/no verifier under the configs' model names, answering
about the synthetic dataset with the same parameters (conf/dataset/synthetic.yaml)."""

from __future__ import annotations

import argparse

import uvicorn

from rescue.datasets.synthetic import SyntheticDataset

from .scripts import PlannerScript, Targets, VerifierScript, hash_judge, overlay_iou_judge
from .server import REASONING_PLACEMENTS, StandIn


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m standin", description=__doc__)
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--num-samples", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--planner-model", default="Qwen3-VL-8B-Instruct")
    p.add_argument("--verifier-model", default="Qwen3-VL-32B-Thinking")
    p.add_argument("--reasoning-placement", default="reasoning", choices=REASONING_PLACEMENTS)
    p.add_argument("--judge", default="hash", choices=("hash", "iou"),
                   help="iou needs the verifier's views [overlay, image] and PNG images")
    p.add_argument("--p-broken", type=float, default=0.05)
    p.add_argument("--planner-latency", type=float, default=0.0,
                   help="seconds each planner request takes (0: answer at once)")
    p.add_argument("--verifier-latency", type=float, default=0.0)
    p.add_argument("--continuation-latency", type=float, default=0.05,
                   help="seconds of a continue_final_message request (cached prefill, 1 token)")
    p.add_argument("--planner-capacity", type=int, default=16, help="requests served at once")
    p.add_argument("--verifier-capacity", type=int, default=32)
    p.add_argument("--reasoning-words", type=int, default=0,
                   help="pad the verifier's reasoning to this many words (a thinking model's)")
    p.add_argument("--opaque-verifier-images", action="store_true",
                   help="never decode the verifier's images (the hash judge reads their URLs)")
    args = p.parse_args()
    ds = SyntheticDataset(num_samples=args.num_samples, seed=args.seed, height=args.height,
                          width=args.width)
    targets = Targets(ds.load(i) for i in ds.sample_ids())
    reasoning = (" ".join(["the region covers the object, yes"] * (args.reasoning_words // 6 + 1))
                 if args.reasoning_words else None)
    latency = {m: t for m, t in ((args.planner_model, args.planner_latency),
                                 (args.verifier_model, args.verifier_latency)) if t > 0}
    judge = overlay_iou_judge(targets) if args.judge == "iou" else hash_judge
    standin = StandIn({args.planner_model: PlannerScript(targets, p_broken=args.p_broken),
                       args.verifier_model: VerifierScript(judge, reasoning=reasoning)},
                      reasoning_placement=args.reasoning_placement, latency_s=latency,
                      continuation_latency_s=args.continuation_latency,
                      opaque_images=frozenset([args.verifier_model] if
                                              args.opaque_verifier_images else []),
                      capacity={args.planner_model: args.planner_capacity,
                                args.verifier_model: args.verifier_capacity})
    uvicorn.run(standin.app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
