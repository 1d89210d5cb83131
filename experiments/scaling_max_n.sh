#!/usr/bin/env bash
# Study: how far does quality keep growing with N, up to 64, and is the estimate stable in the
# pool size? (GPU cluster, RefCOCO val, 10% subset)
# Usage: experiments/scaling_max_n.sh OUT_DIR [hydra overrides...]   (not max_n: it is set here)
# Needs the three servers up (python -m servers.launch layout=... action=start) for step 1 only.
#   1. OUT_DIR/generate: 64 hypotheses per sample, generated once into the cache.
#   2. OUT_DIR/dense: mode=evaluate on those records, a dense N grid and 5000 bootstrap
#      resamples (no model is called).
#   3. OUT_DIR/pools/{0..3}: max_n=8,16,32,64 with offline=true, all served from the cache (zero
#      model calls): best-of-N at N <= 8 estimated from pools of 8 to 64 hypotheses. The exact
#      estimator is unbiased in the pool size, so the lines should agree, the bands narrowing.
set -euo pipefail
study_group=scaling_max_n
source "$(dirname "${BASH_SOURCE[0]}")/study.sh"  # out, python, group; "$@": overrides
study=(experiment=refcoco_multi_n subset.fraction=0.1)

"$python" run.py "${study[@]}" max_n=64 "${group[@]}" hydra.run.dir="$out/generate" "$@"
"$python" run.py mode=evaluate "${study[@]}" max_n=64 records_from="$out/generate" \
  'n_grid=[1,2,3,4,6,8,12,16,24,32,48,64]' selection.bootstrap=5000 \
  hydra.run.dir="$out/dense" "$@"
"$python" run.py -m "${study[@]}" offline=true max_n=8,16,32,64 'n_grid=[1,2,4,8]' \
  "${group[@]}" hydra.sweep.dir="$out/pools" "$@"
"$python" -m analysis.compare "$out/pools" --out "$out/pools" --selector verifier
