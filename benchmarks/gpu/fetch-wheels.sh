#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, transformers, accelerate, peft, pyarrow, pandas, ... but not
# trl, datasets, pydantic, deepspeed, hjson, dill, multiprocess; it reaches no network). transformers and tokenizers
# travel too, at the versions the CPU test tier runs, so both machines run the same model code. Run here, in the repo root;
# the folder .whl/ is git-ignored through .git/info/exclude and carried to the device run. Python 3.12 wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
py=${PYTHON:-python3}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download -q --no-deps "${plat[@]}" -d .whl \
  trl==1.16.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types typing-inspection hjson typing-extensions==4.16.0 \
  transformers==5.24.0 tokenizers==0.23.3 "regex>=2025.10.22"
# DeepSpeed ships an sdist only: build its pure-Python wheel here (DS_BUILD_OPS=0: ops JIT-compile on first use).
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
cat <<'MSG'
Device run (one call; timeout ~540 s; prints the table, JSON under $OUT):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \
  python3 benchmarks/gpu/h100_gprl_vs_trl.py --steps 8 --warmup 2 --out $OUT/gpu-bench.json 2>&1 | tee $OUT/log
(carry: [".whl"])
MSG
