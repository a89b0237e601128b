import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, toy_tokenizer, toy_backbone_config):
    """A tiny Llama policy (head_dim 32, as vLLM's CPU backend needs), a 3-axis GPM and a few prompts, on disk."""
    from transformers import LlamaForCausalLM

    from gprl.gpm import GeneralPreferenceModel, GPMConfig

    root = tmp_path_factory.mktemp("scaleout-assets")
    torch.manual_seed(0)
    policy = LlamaForCausalLM(toy_backbone_config)
    policy.generation_config.pad_token_id = toy_tokenizer.pad_token_id
    policy.save_pretrained(root / "policy")
    toy_tokenizer.save_pretrained(root / "policy")
    gpm = GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=3))
    torch.nn.init.normal_(gpm.eigenvalue_gate.weight, std=1.0)
    gpm.save_pretrained(root / "gpm")
    toy_tokenizer.save_pretrained(root / "gpm")
    words = ["rock", "paper", "scissors", "good the", "a of x", "which wins y", "x y z", "the rock wins"]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return root


@pytest.fixture(scope="session")
def warm_deepspeed():
    """Build DeepSpeed's CPU ops once per session (a no-op when ~/.cache/torch_extensions is warm)."""
    pytest.importorskip("deepspeed")
    venv = Path(sys.executable).resolve().parent.parent
    res = subprocess.run([str(REPO / "scripts" / "warm-deepspeed.sh"), str(Path(sys.prefix))],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        pytest.fail(f"scripts/warm-deepspeed.sh failed:\n{res.stdout}\n{res.stderr}")
    return venv
