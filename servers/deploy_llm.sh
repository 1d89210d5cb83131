#!/usr/bin/env bash
# Verifier (Qwen3-VL-32B-Thinking, vLLM) on the GPUs its layout assigns (default layout: $RESCUE_LAYOUT or mi325x_4).
# Extra key=value arguments go to servers.launch, e.g. layout=h100_1 timeout_s=3600 or
# layout.services.verifier.port=9000. Waits until the service is ready; stop it with
#   python -m servers.launch layout=mi325x_4 action=stop "services=[verifier]"
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m servers.launch layout="${RESCUE_LAYOUT:-mi325x_4}" action=start \
  "services=[verifier]" "$@"
