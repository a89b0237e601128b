"""`gprl export`: a trained policy as a plain Hugging Face folder that `transformers` and vLLM load directly.

The source is a run folder (its newest valid checkpoint), one checkpoint folder, or a policy folder. LoRA adapters
are merged into their base model; the folder holds config, safetensors weights, generation config and tokenizer,
and no absolute path of the machine it was written on. `--push-to org/name` uploads it to the hub (refused, with
the reason, in offline mode).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from gprl.checkpoint import InvalidCheckpoint, atomic_dir, checkpoint_folders, verify_manifest
from gprl.sources import SourceError, offline, resolve_model


class ExportError(ValueError):
    """A source that cannot be exported; the message names it and the fix."""


def policy_folder(source: str | Path, log: Callable[[str], None] = print) -> Path:
    """The policy folder of a run folder, a checkpoint folder or a policy folder."""
    src = Path(source)
    if not src.is_dir():
        raise ExportError(f"{src}: no such folder (give a run folder, a checkpoint folder or a policy folder)")
    if (src / "checkpoints").is_dir():
        for ckpt in checkpoint_folders(src / "checkpoints"):
            try:
                verify_manifest(ckpt)
            except InvalidCheckpoint as exc:
                log(f"warning: skipping checkpoint {ckpt}: {exc}")
                continue
            if (ckpt / "policy").is_dir():
                log(f"exporting {ckpt.name} of {src}")
                return ckpt / "policy"
        raise ExportError(f"{src}: no valid checkpoint with a policy/ folder under checkpoints/")
    if (src / "policy").is_dir():
        if (src / "manifest.json").exists():
            try:
                verify_manifest(src)
            except InvalidCheckpoint as exc:
                raise ExportError(f"{src}: damaged checkpoint ({exc})") from None
        return src / "policy"
    if (src / "config.json").exists() or (src / "adapter_config.json").exists():
        return src
    raise ExportError(f"{src}: not a run, checkpoint or model folder (no checkpoints/, policy/ or config.json)")


def _load(policy_dir: Path, log: Callable[[str], None]):
    from transformers import AutoModelForCausalLM

    adapter = policy_dir / "adapter_config.json"
    if not adapter.exists():
        return AutoModelForCausalLM.from_pretrained(policy_dir), None
    from peft import PeftModel

    base_ref = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base_ref:
        raise ExportError(f"{adapter}: names no base model (base_model_name_or_path)")
    try:
        base_dir = resolve_model(base_ref, "the adapters' base model", log)
    except SourceError as exc:
        raise ExportError(str(exc)) from None
    log(f"merging LoRA adapters of {policy_dir} into {base_ref}")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), policy_dir).merge_and_unload()
    return merged, base_ref


def _scrub_paths(folder: Path, name: str) -> None:
    """No absolute path in the exported JSON files: `_name_or_path` becomes the export's own name."""
    for f in folder.glob("*.json"):
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(data, dict):
            changed = False
            for key in ("_name_or_path", "name_or_path", "base_model_name_or_path"):
                if isinstance(data.get(key), str) and Path(data[key]).is_absolute():
                    data[key], changed = name, True
            if changed:
                f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_policy(source: str | Path, out: str | Path, push_to: str | None = None, private: bool = True,
                  log: Callable[[str], None] = print) -> Path:
    from transformers import AutoTokenizer

    policy_dir = policy_folder(source, log)
    model, base = _load(policy_dir, log)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; choose a new folder")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _scrub_paths(tmp, push_to or out.name)
    log(f"wrote {out} ({'LoRA merged into ' + base if base else 'full weights'})")
    if push_to:
        push(out, push_to, private, log)
    return out


def push(folder: Path, repo_id: str, private: bool, log: Callable[[str], None]) -> None:
    if offline():
        raise ExportError(f"not pushing to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); {folder} is written — "
                          f"push it later with `hf upload {repo_id} {folder}`")
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="gprl export")
    except Exception as exc:  # network, authentication, permissions
        raise ExportError(f"push to {repo_id} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); {folder} "
                          f"is written — check `hf auth login` and the network, then `hf upload {repo_id} {folder}`")
    log(f"pushed {folder} to {repo_id}")
