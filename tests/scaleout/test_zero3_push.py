"""A ZeRO-3 push gathers one module at a time (not the whole model) and delivers the same tensors as the
consolidated state dict, over HTTP buckets and over the gloo group: 2 DeepSpeed ranks on CPU, a rollout server on
loopback in rank 0's process."""

from pathlib import Path

import pytest
import torch

from _common import torchrun

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]
pytest.importorskip("deepspeed")
HERE = Path(__file__).resolve().parent


def test_layerwise_zero3_push_delivers_the_consolidated_weights(tiny_assets, warm_deepspeed, tmp_path):
    out = tmp_path / "push.pt"
    res = torchrun([str(HERE / "_zero3_push_rank.py"), str(tiny_assets / "policy"), str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-4000:]
    got = torch.load(out)
    assert got["world"] == 2 and got["commits"] == {"http": 1, "collective": 1}
    state = got["state"]
    for push in got["pushes"]:  # version 1 over HTTP, version 2 over the group
        assert list(push) == list(got["pushes"][0]) and set(push) <= set(state)
        for name, t in push.items():
            torch.testing.assert_close(t, state[name], rtol=0, atol=0, msg=name)
    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_assets / "policy").named_parameters())
    assert any(not torch.equal(t, initial[n].detach()) for n, t in got["pushes"][0].items())  # the step moved them
    walk = len(got["gathers"]) // 2
    assert walk > 10 and max(got["gathers"]) < got["total"] / 4  # one module per gather, two walks
