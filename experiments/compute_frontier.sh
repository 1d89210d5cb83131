#!/usr/bin/env bash
# Study: quality per unit of compute. Which (verifier, max_n) reaches a given gIoU cheapest?
# Usage: experiments/compute_frontier.sh OUT_DIR [hydra overrides...]
# One Hydra multirun into OUT_DIR/{0..5}: verifier x max_n (4, 8, 16), every run evaluated at
# N = 1, 2, 4 with its cost columns (expected tokens per sample, issue 12); the planner's
# hypotheses and masks are shared through the cache. Then analysis.compare draws the study and
# OUT_DIR/study_frontier.md: the Pareto frontier of gIoU against expected tokens and the
# cheapest configuration reaching 90/95/99% of the best gIoU (printed).
# On CPU the two verifiers are simulated ones of different noise (SWEEP below); on a cluster
# give the real models, e.g.
#   SWEEP="verifier=qwen3vl_8b_instruct,qwen3vl_32b_thinking" \
#     experiments/compute_frontier.sh OUT experiment=refcoco_multi_n subset.fraction=0.1
set -euo pipefail
study_group=compute_frontier
source "$(dirname "${BASH_SOURCE[0]}")/study.sh"  # out, python, group; "$@": overrides
sweep="${SWEEP:-verifier.noise=0.1,0.3}"

"$python" run.py -m "$sweep" max_n=4,8,16 'n_grid=[1,2,4]' "${group[@]}" \
  hydra.sweep.dir="$out" "$@"
"$python" -m analysis.compare "$out" --out "$out" --selector verifier
cat "$out/study_frontier.md"
