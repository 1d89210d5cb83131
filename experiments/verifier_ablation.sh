#!/usr/bin/env bash
# Study: which verifier picks best, and how does the gap grow with N? (GPU cluster, ReasonSeg)
# Usage: experiments/verifier_ablation.sh OUT_DIR [hydra overrides...]
# Needs the planner (8002), SAM3 (8001) and verifier (8000) servers up:
#   python -m servers.launch layout=mi325x_4 action=start
# Three jobs, one per verifier, in OUT_DIR/{0,1,2}. The planner's hypotheses and SAM3's masks
# are cached by the first job and read back by the others: only verification reruns.
# (qwen3vl_8b_instruct verifies on the planner's server, 8002.)
set -euo pipefail
study_group=verifier_ablation
source "$(dirname "${BASH_SOURCE[0]}")/study.sh"  # out, python, group; "$@": overrides

"$python" run.py -m experiment=reasonseg_multi_n \
  verifier=qwen3vl_32b_thinking,qwen3vl_32b_thinking_rating,qwen3vl_8b_instruct \
  "${group[@]}" hydra.sweep.dir="$out" "$@"
"$python" -m analysis.compare "$out" --out "$out" --selector verifier
"$python" -m analysis.compare "$out" --out "$out/ciou" --selector verifier --metric ciou
