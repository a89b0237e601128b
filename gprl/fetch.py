"""`gprl fetch`: download `hf://` model and dataset sources into a cache folder, once.

The operator runs it as the init container of every pod of a run with hub sources (Kubeflow Trainer's model and
dataset initializers do the same job); the pods then mount the cache read-only and run with HF_HUB_OFFLINE=1.
Each source lands at a path fixed by its id (`gprl.api.pods.Source.local_path`, relative to --dest), so the operator
can write it into the run's config before anything is downloaded. A second call finds the files in place and
downloads nothing (huggingface_hub's local-dir metadata), which is what a replaced pod, a second pod, or another
run sharing the cache claim sees. Offline clusters use `pvc://` sources instead.
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from pathlib import Path

from gprl.api.pods import MODELS_ROOT, parse_source


def fetch(uri: str, dest: str | Path, log=print) -> Path:
    """Download one `hf://` source under dest; returns its folder."""
    from huggingface_hub import snapshot_download

    src = parse_source(uri, "source")
    if src.kind != "hf":
        raise ValueError(f"{uri!r}: gprl fetch downloads hf:// sources only")
    hub_root = posixpath.join(MODELS_ROOT, "hub")
    target = Path(dest) / posixpath.relpath(src.local_path(), hub_root)
    log(f"[fetch] {uri} -> {target}")
    snapshot_download(src.repo, repo_type=src.repo_type, revision=src.revision, local_dir=str(target))
    return target


def fetch_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gprl fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", required=True, help="cache folder (the operator mounts the cache claim at /models/hub)")
    p.add_argument("sources", nargs="+", metavar="hf://ORG/NAME[@REV]",
                   help="hub sources; hf://datasets/ORG/NAME for a dataset")
    args = p.parse_args(argv)
    for uri in args.sources:
        fetch(uri, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(fetch_main())
