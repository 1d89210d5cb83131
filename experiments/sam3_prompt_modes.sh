#!/usr/bin/env bash
# Study: which SAM3 prompt mode turns the planner's hypotheses into the best masks? (GPU, ReasonSeg)
# Usage: experiments/sam3_prompt_modes.sh OUT_DIR [hydra overrides...]
# Needs the planner (8002), SAM3 (8001, its `sam3` or `hf` backend with points enabled) and
# verifier (8000) servers up: python -m servers.launch layout=mi325x_4 action=start
# Four jobs, one per executor.prompt_mode, in OUT_DIR/{0,1,2,3}. The mode is in the execute key
# only: the planner's hypotheses are cached once (or already are, by reasonseg_multi_n) and
# read back by every job, which re-executes them under its mode and verifies the new masks.
set -euo pipefail
study_group=sam3_prompt_modes
source "$(dirname "${BASH_SOURCE[0]}")/study.sh"  # out, python, group; "$@": overrides

"$python" run.py -m experiment=sam3_prompt_modes \
  executor.prompt_mode=text,text_box,box,box_points \
  "${group[@]}" hydra.sweep.dir="$out" "$@"
"$python" -m analysis.compare "$out" --out "$out" --selector verifier
"$python" -m analysis.compare "$out" --out "$out/ciou" --selector verifier --metric ciou
