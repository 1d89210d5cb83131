#!/usr/bin/env bash
# Study: the peers' ways of deciding among the same cached candidates, beside our verifier:
# StAR's cluster vote (best-of-cluster, pixel majority), verifier-weighted fusion, SAM 3 Agent's
# accept/reject, EVOL-SAM3's pairwise arena and listwise Set-of-Marks.
# Usage: experiments/peer_methods.sh OUT_DIR [hydra overrides...]
# Default: the CPU demo with the simulated verifier's call shapes. A GPU study names the real
# verifier configs, e.g. POINTWISE=qwen3vl_32b_thinking ACCEPT=qwen3vl_32b_thinking_accept
# PAIRWISE=qwen3vl_32b_thinking_pairwise LISTWISE=qwen3vl_32b_thinking_listwise
# experiments/peer_methods.sh OUT experiment=reasonseg_multi_n
# Four runs, OUT_DIR/{pointwise,accept,pairwise,listwise}, on one cache: the first plans and
# segments; the other three call only their verifier. Then one table and one figure in OUT_DIR.
set -euo pipefail
study_group=peer_methods
source "$(dirname "${BASH_SOURCE[0]}")/study.sh"  # out, python, group; "$@": overrides

"$python" run.py verifier="${POINTWISE:-simulated}" hydra.run.dir="$out/pointwise" \
  'selection.aggregators=[vote_best,vote_majority,verifier_fusion]' "${group[@]}" "$@"
"$python" run.py verifier="${ACCEPT:-simulated_accept}" hydra.run.dir="$out/accept" \
  'selection.selectors=[verifier]' 'selection.aggregators=[agent_accept]' "${group[@]}" "$@"
"$python" run.py verifier="${PAIRWISE:-simulated_pairwise}" hydra.run.dir="$out/pairwise" \
  'selection.selectors=[arena]' selection.primary=arena "${group[@]}" "$@"
"$python" run.py verifier="${LISTWISE:-simulated_listwise}" hydra.run.dir="$out/listwise" \
  'selection.selectors=[listwise]' selection.primary=listwise "${group[@]}" "$@"
"$python" -m analysis.peer_methods "$out/pointwise" "$out/accept" "$out/pairwise" \
  "$out/listwise" --out "$out"
