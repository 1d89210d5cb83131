#!/usr/bin/env bash
# Study: how does the verifier's noise change best-of-N selection? (CPU, simulated models)
# Usage: experiments/demo_noise_sweep.sh OUT_DIR [hydra overrides...]
# Three demo runs (verifier.noise 0.1, 0.3, 0.6) as one Hydra multirun into OUT_DIR/{0,1,2};
# the planner's hypotheses and masks are shared through the cache, only verification differs.
# Then OUT_DIR/study.{csv,md} and study_iou_vs_n.png compare them.
set -euo pipefail
study_group=demo_noise
source "$(dirname "${BASH_SOURCE[0]}")/study.sh"  # out, python, group; "$@": overrides

"$python" run.py -m experiment=demo verifier.noise=0.1,0.3,0.6 "${group[@]}" \
  hydra.sweep.dir="$out" "$@"
"$python" -m analysis.compare "$out" --out "$out" --selector verifier
