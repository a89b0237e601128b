#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment outside the repo and installs gprl into it.
# Re-running is cheap: a stamp of pyproject.toml's hash skips pip when nothing changed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${GPRL_CACHE:-$HOME/.cache/gprl}
venv=${GPRL_VENV:-$cache/venv}
py=${PYTHON:-python3}
mkdir -p "$cache"
if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $venv" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.gprl-stamp"
# The checkout's path is part of the stamp: the editable install must point at this checkout, not another one.
# constraints.txt pins every package to the versions the tests pass with (a fresh install gets exactly those).
want=$( (echo "$here"; cat "$here/pyproject.toml" "$here/operator/pyproject.toml" "$here/constraints.txt") | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$venv/bin/python" -c "import gprl, gprl_operator" 2>/dev/null; then
  echo "[bootstrap] installing gprl and its dependencies (first time: several minutes, torch is large)" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -c "$here/constraints.txt" -e "$here[dev]" >&2
  "$venv/bin/pip" install -q --no-deps -e "$here/operator" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
