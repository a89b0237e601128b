#!/usr/bin/env bash
# The project's test command: installs what the tests need (venv, Kubernetes binaries), then runs pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
venv=$(scripts/bootstrap.sh)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" -m pytest "$@"
