import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: on a 2-core machine shared with the control plane, two spinning OpenMP threads run far slower.
torch.set_num_threads(1)

TOY_WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "rock", "paper", "scissors", "good", "the", "a", "of", "and",
             "x", "y", "z", "w", "which", "wins"]


@pytest.fixture(scope="session")
def toy_tokenizer():
    """A word-level tokenizer built locally (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOY_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def toy_backbone_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(TOY_WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, toy_tokenizer, toy_backbone_config):
    """A tiny Llama policy (head_dim 32, as vLLM's CPU backend needs), a 3-axis GPM and a few prompts, on disk."""
    from transformers import LlamaForCausalLM

    import json

    from gprl.gpm import GeneralPreferenceModel, GPMConfig

    root = tmp_path_factory.mktemp("tiny-assets")
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
