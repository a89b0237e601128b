"""The rollout server's HTTP protocol and the trainer-side client, with a fake engine (no vLLM): bucketed pushes,
versions on every rollout, 409 → re-push after a server restart, a push that loses its session starts over."""

import threading

import pytest
import torch


class FakeEngine:
    """Stands in for VLLMEngine: 'generates' the prompt's last token + version, holds the pushed weights."""

    def __init__(self, version=0):
        self.version, self.model, self.weights, self.loads = version, "fake", {}, 0

    def generate_ids(self, prompt_ids, n, **kw):
        out = [[([p[-1] + self.version, 1], [-0.5, -0.25]) for _ in range(n)] for p in prompt_ids]
        return self.version, out

    def load_weights(self, weights, version):
        self.weights = {k: v.clone() for k, v in weights}
        self.version, self.loads = version, self.loads + 1


def serve(engine, port=0):
    from gprl.serving.rollout_server import build_server

    srv = build_server(engine, "127.0.0.1", port)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture()
def policy(toy_backbone_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(toy_backbone_config)


def client(url, tok):
    from gprl.config import RolloutSpec
    from gprl.rollout.remote import RemoteRollout

    return RemoteRollout([url], tok, RolloutSpec(max_new_tokens=4), 16, bucket_mb=0.05, log=lambda *_: None,
                         base_delay=0.01, attempts=5)


def test_push_in_buckets_versions_and_restart_resync(policy, toy_tokenizer):
    from gprl.distributed import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = FakeEngine()
    srv = serve(engine, port)
    rollout = client(url, toy_tokenizer)
    batch = rollout.generate(["rock paper", "x y"], 2)
    assert batch.policy_version == 0 and batch.sequences.shape[0] == 4
    assert batch.sampler_logp[0, :2].tolist() == [-0.5, -0.25] and batch.response_mask[0].tolist() == [1, 1]

    rollout.sync_weights(policy, 1)  # 0.05 MB buckets: many requests, one commit
    assert engine.version == 1 and engine.loads == 1
    want = dict(policy.named_parameters())
    assert set(engine.weights) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(engine.weights[k], v.detach())
    assert rollout.generate(["rock"], 2).policy_version == 1

    # the server "restarts": a new process at version 0 on the same port; the next rollout re-pushes version 1
    srv.shutdown(); srv.server_close()
    engine2 = FakeEngine()
    srv2 = serve(engine2, port)
    try:
        batch = rollout.generate(["rock"], 2)
        assert batch.policy_version == 1 and engine2.version == 1 and engine2.loads == 1 and rollout.pushes == 2
    finally:
        srv2.shutdown(); srv2.server_close()


def test_stale_rollout_is_detected_when_the_client_cannot_push(toy_tokenizer):
    from gprl.rollout import StaleRollout

    srv = serve(FakeEngine())
    try:
        rollout = client(f"http://127.0.0.1:{srv.server_address[1]}", toy_tokenizer)
        rollout.version = 3  # the learner is at 3, but this client holds no policy to push
        with pytest.raises(StaleRollout, match="weights version 0, learner at 3"):
            rollout.generate(["rock"], 2)
    finally:
        srv.shutdown(); srv.server_close()


def test_a_push_whose_session_is_lost_starts_over(policy, toy_tokenizer):
    from gprl.serving.http import request

    engine = FakeEngine()
    srv = serve(engine)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        rollout = client(url, toy_tokenizer)
        real_post, lost = rollout._post, {"done": False}

        def forgetful_post(u, path, payload=None, **kw):
            if path.startswith("/weights/bucket") and not lost["done"]:
                lost["done"] = True  # as if the server restarted between begin and this bucket
                path = "/weights/bucket?session=forgotten"
            return real_post(u, path, payload, **kw)

        rollout._post = forgetful_post
        rollout.sync_weights(policy, 2)
        assert lost["done"] and engine.version == 2 and engine.loads == 1
        status, _, body = request(url + "/generate", {"prompt_ids": [[4]], "n": 1, "min_version": 3})
        assert status == 409 and b'"version": 2' in body
    finally:
        srv.shutdown(); srv.server_close()
