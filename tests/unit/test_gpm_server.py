"""`gprl serve-gpm` in-process: batched scoring equals local scoring; the client retries, then fails clearly."""

import threading
import time

import pytest
import torch

from gprl.gpm import GeneralPreferenceModel, GPMConfig


@pytest.fixture(scope="module")
def gpm(toy_backbone_config):
    torch.manual_seed(0)
    model = GeneralPreferenceModel.from_backbone_config(toy_backbone_config, GPMConfig(axes=3)).eval()
    torch.nn.init.normal_(model.eigenvalue_gate.weight, std=1.0)
    return model


@pytest.fixture()
def server(gpm, toy_tokenizer):
    from gprl.serving.gpm_server import build_server

    srv = build_server(gpm, toy_tokenizer, "127.0.0.1", 0, batch_size=8, window_s=0.05)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


PROMPTS = ["rock", "paper", "which wins", "good the"]
RESPONSES = ["x y", "a of", "scissors", "the rock wins"]


def test_scores_equal_local_and_concurrent_requests_are_batched(server, gpm, toy_tokenizer):
    from gprl.serving.gpm_client import GPMClient

    srv, url = server
    client = GPMClient(url)
    assert client.config.axes == 3 and client.config.beta == gpm.config.beta
    want = gpm.score(toy_tokenizer, PROMPTS, RESPONSES)
    got = client.score(None, PROMPTS, RESPONSES)
    torch.testing.assert_close(got.embeddings, want.embeddings, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.eigenvalues, want.eigenvalues, rtol=1e-5, atol=1e-6)

    results, batches_before = {}, srv.scorer.batches
    def call(i):
        results[i] = client.score(None, PROMPTS[i:] + PROMPTS[:i], RESPONSES[i:] + RESPONSES[:i])
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, out in results.items():
        torch.testing.assert_close(out.embeddings, torch.roll(want.embeddings, -i, 0), rtol=1e-5, atol=1e-6)
    assert srv.scorer.batches - batches_before < 4  # some of the 4 concurrent requests shared a forward pass


def test_client_retries_then_fails_clearly():
    from gprl.distributed import free_port
    from gprl.serving.gpm_client import GPMClient, GPMServerUnavailable

    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    client = GPMClient(url, attempts=3, base_delay=0.01)
    t0 = time.monotonic()
    with pytest.raises(GPMServerUnavailable, match=r"GPM server .* no answer after 3 attempts"):
        client.score(None, ["rock"], ["x"])
    assert time.monotonic() - t0 < 5


def test_client_rides_out_a_late_start(gpm, toy_tokenizer):
    """The server comes up while the client is backing off: the call succeeds."""
    from gprl.distributed import free_port
    from gprl.serving.gpm_client import GPMClient
    from gprl.serving.gpm_server import build_server

    port = free_port()
    holder = {}

    def start_later():
        time.sleep(0.6)
        holder["srv"] = srv = build_server(gpm, toy_tokenizer, "127.0.0.1", port)
        srv.serve_forever()

    threading.Thread(target=start_later, daemon=True).start()
    try:
        out = GPMClient(f"http://127.0.0.1:{port}", attempts=8, base_delay=0.1).score(None, ["rock"], ["x y"])
        assert out.embeddings.shape == (1, 6) and out.eigenvalues.shape == (1, 3)
    finally:
        while "srv" not in holder:
            time.sleep(0.05)
        holder["srv"].shutdown()
        holder["srv"].server_close()


def test_trainer_scores_through_the_server(server, gpm, toy_tokenizer, toy_backbone_config, tmp_path, monkeypatch):
    """One trainer step scored by the server equals the same step scored in-process; a dead server fails the step
    with an error that names it."""
    import json

    from transformers import LlamaForCausalLM

    from gprl.config import parse_config
    from gprl.serving.gpm_client import GPMServerUnavailable
    from gprl.trainer import Trainer

    srv, url = server
    torch.manual_seed(0)
    policy = LlamaForCausalLM(toy_backbone_config)
    policy.generation_config.pad_token_id = toy_tokenizer.pad_token_id
    policy.save_pretrained(tmp_path / "policy")
    toy_tokenizer.save_pretrained(tmp_path / "policy")
    gpm.save_pretrained(tmp_path / "gpm")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in PROMPTS))

    def spec(out, server_url=None):
        return parse_config({
            "seed": 1, "model": {"policy": str(tmp_path / "policy")},
            "gpm": {"path": str(tmp_path / "gpm"), "axes": 3, "serverUrl": server_url},
            "data": {"prompts": str(tmp_path / "prompts.jsonl")},
            "algo": {"steps": 1, "prompts_per_step": 2, "group_size": 3, "learning_rate": 1e-3},
            "rollout": {"max_new_tokens": 5},
            "output": {"dir": str(tmp_path / out), "progress": False, "report": False, "eval_prompts": 2,
                       "eval_samples": 1},
        })

    quiet = lambda *_: None  # noqa: E731
    local = Trainer(spec("local"), log=quiet).train()[0]
    remote_trainer = Trainer(spec("remote", url), log=quiet)
    remote = remote_trainer.train()[0]
    for key in ("loss", "kl", "axis_variance", "eigenvalues", "advantage_abs_mean"):
        assert remote[key] == pytest.approx(local[key], rel=1e-5, abs=1e-6), key

    srv.shutdown()
    srv.server_close()
    monkeypatch.setenv("GPRL_GPM_ATTEMPTS", "2")
    remote_trainer.gpm.attempts, remote_trainer.gpm.base_delay = 2, 0.01
    with pytest.raises(GPMServerUnavailable, match="GPM server http://127.0.0.1"):
        remote_trainer.train_step()


def test_gprl_serve_gpm_from_a_run_config(gpm, toy_tokenizer, tmp_path):
    """`gprl serve-gpm --config run.yaml` (how the operator's GPM Deployment starts it): the GPM of the config, with
    the policy's tokenizer when the GPM folder has none, as the trainer does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from gprl.distributed import free_port
    from gprl.serving.gpm_client import GPMClient
    from gprl.serving.http import wait_healthy

    gpm.save_pretrained(tmp_path / "gpm")  # no tokenizer here
    toy_tokenizer.save_pretrained(tmp_path / "policy")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"policy": str(tmp_path / "policy")},
                                   "gpm": {"path": str(tmp_path / "gpm"), "axes": 3, "batchSize": 4}}))
    port = free_port()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "gprl.cli", "serve-gpm", "--config", str(cfg), "--host", "127.0.0.1",
                             "--port", str(port), "--threads", "1"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONPATH=str(repo)))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, "serve-gpm", timeout=120)
        out = GPMClient(url).score(None, PROMPTS, RESPONSES)
        want = gpm.score(toy_tokenizer, PROMPTS, RESPONSES)
        torch.testing.assert_close(out.eigenvalues, want.eigenvalues, rtol=1e-5, atol=1e-6)
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_request_fails_alone_and_batches_stay_bounded(gpm, toy_tokenizer):
    """20 good requests and one whose pass fails, concurrently: only the bad one fails (as a 500 naming its error);
    no forward pass exceeds max_batch even when requests arrive together."""
    from gprl.serving.gpm_client import GPMClient
    from gprl.serving.gpm_server import build_server
    from gprl.serving.http import ServerError

    class Fragile:
        config = gpm.config
        sizes = []

        def score(self, tok, prompts, responses, **kw):
            self.sizes.append(len(prompts))
            if "BOOM" in responses:
                raise RuntimeError("this response breaks the model")
            return gpm.score(tok, prompts, responses, **kw)

    fragile = Fragile()
    srv = build_server(fragile, toy_tokenizer, "127.0.0.1", 0, max_batch=8, window_s=0.2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    client = GPMClient(url, attempts=1)
    want = gpm.score(toy_tokenizer, PROMPTS, RESPONSES)
    results, errors = {}, {}

    def call(i):
        try:
            results[i] = client.score(None, PROMPTS, ["BOOM"] * 4 if i == 7 else RESPONSES)
        except ServerError as exc:
            errors[i] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a retry budget of 1 turns a 500 into ServerUnavailable
            errors[i] = str(exc)

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(21)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert list(errors) == [7] and "this response breaks the model" in errors[7]
        assert len(results) == 20
        for out in results.values():
            torch.testing.assert_close(out.eigenvalues, want.eigenvalues, rtol=1e-5, atol=1e-6)
        assert max(fragile.sizes) <= 8 and srv.scorer.batches < 21
    finally:
        srv.shutdown()
        srv.server_close()
