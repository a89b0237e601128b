#!/usr/bin/env bash
# Build the trainer image (scripts/build-images.sh trainer) and run a 2-step `gprl train` inside it on tiny local
# assets (a 2-layer Llama policy, a k = 3 GPM, 8 prompts; tests/cluster/drift_lib.py builds them), as the image's
# user 1000, with the assets mounted read-only and the output folder read-write. Exit status 0 = trained and
# checkpointed. `make test-trainer-image`; GPRL_IMAGES_REUSE=1 reuses an already built image.
# GPRL_TRAINER_EXTRAS (default here: deepspeed) — the release build's default is "vllm,deepspeed" (GPU vLLM wheels
# pin their own torch and CUDA stack: ~10 GB more, and nothing here could run them).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${GPRL_VENV:-$("$here/scripts/bootstrap.sh")}
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$here/pyproject.toml" | head -1)
ref=localhost/gprl/trainer:$version
buildah=(buildah --storage-driver "${GPRL_BUILDAH_DRIVER:-vfs}")
if [ "${GPRL_IMAGES_REUSE:-0}" != 1 ] || ! "${buildah[@]}" inspect --type image "$ref" >/dev/null 2>&1; then
  GPRL_TRAINER_EXTRAS=${GPRL_TRAINER_EXTRAS-deepspeed} "$here/scripts/build-images.sh" trainer >/dev/null
fi
work=$(mktemp -d /tmp/gprl-trainer-image.XXXXXX)
ctr=""
cleanup() { [ -n "$ctr" ] && "${buildah[@]}" rm "$ctr" >/dev/null 2>&1; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/assets" "$work/out"
PYTHONPATH="$here:$here/tests/cluster" "$venv/bin/python" - "$work" <<'PY'
import sys
from pathlib import Path

import yaml

from drift_lib import build_assets, run_spec

work = Path(sys.argv[1])
build_assets(work / "assets")
spec = run_spec(Path("/assets"), "in_process", steps=2)
spec["output"].update({"dir": "/out/run"})
spec["checkpoint"] = {"everySteps": 2, "keepLast": 1}
spec.pop("resources", None)
(work / "config.yaml").write_text(yaml.safe_dump(spec))
PY
chmod -R a+rX "$work"; chmod a+rwx "$work/out"
ctr=$("${buildah[@]}" from --pull=never "$ref")
t0=$(date +%s)
"${buildah[@]}" run --isolation chroot --user 1000:1000 \
  -v "$work/assets:/assets:ro" -v "$work/config.yaml:/etc/gprl/config.yaml:ro" -v "$work/out:/out" \
  --env HF_HUB_OFFLINE=1 --env TRANSFORMERS_OFFLINE=1 "$ctr" -- \
  gprl train --config /etc/gprl/config.yaml
echo "TIME trainer-image-2-steps $(( $(date +%s) - t0 ))s" >&2
steps=$(wc -l < "$work/out/run/steps.jsonl")
ls "$work/out/run/checkpoints" >&2
[ "$steps" -eq 2 ] || { echo "expected 2 step records, got $steps" >&2; exit 1; }
ls -d "$work/out/run/checkpoints/"step-* >/dev/null || { echo "no checkpoint written" >&2; exit 1; }
echo "trainer image $ref: 2 steps trained, checkpoint written" >&2
