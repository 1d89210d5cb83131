# Sourced by each study script, after it sets `study_group` (its W&B group):
#   study_group=NAME; source "$(dirname "${BASH_SOURCE[0]}")/study.sh"
# Takes OUT_DIR from the script's first argument (made absolute, created) and shifts it off the
# script's own arguments, so "$@" is then the Hydra overrides; moves to the repo root; sets
# $python (PYTHON, else python) and group, the W&B group override (none with logger=none).
set -euo pipefail
out="${1:?usage: $0 OUT_DIR [hydra overrides...]}"
shift
out="$(mkdir -p "$out" && cd "$out" && pwd)"  # absolute: the next line changes directory
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python}"
group=("logger.group=${study_group:?set study_group before sourcing study.sh}")
for arg in "$@"; do
  if [[ $arg == logger=none ]]; then group=(); fi
done
