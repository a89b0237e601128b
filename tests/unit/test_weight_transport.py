"""`rollout.weightSync.transport`: a Trainer whose rollouts come from a `gprl serve-rollout` server on loopback (the
real build_server, a transformers engine standing in for vLLM) trains the same with weights pushed over a gloo
group as over HTTP buckets, and falls back to HTTP for a server that cannot join."""

import threading

import pytest
import torch

from test_trainer import spec_for


class HFEngine:
    """A transformers policy behind build_server: samples token by token with a generator seeded per request, so
    the completions depend on nothing but the weights the server holds, the prompt and the seed."""

    model = "hf"

    def __init__(self, folder):
        from transformers import AutoModelForCausalLM

        self.net = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.version = 0
        self.calls = []  # (version, completions) of every generate call

    def weight_manifest(self):
        from gprl.serving.weights import manifest_of

        return manifest_of(self.net)

    @torch.no_grad()
    def load_weights(self, weights, version):
        params = dict(self.net.named_parameters())
        for name, t in weights:
            params[name].copy_(t)
        self.version = version

    @torch.no_grad()
    def generate_ids(self, prompt_ids, n, *, temperature=1.0, max_tokens=8, seed=None, stop_token_ids=None, **_):
        gen = torch.Generator().manual_seed(seed or 0)
        out = []
        for prompt in prompt_ids:
            group = []
            for _ in range(n):
                ids, toks, lps = list(prompt), [], []
                for _ in range(max_tokens):
                    logp = torch.log_softmax(self.net(torch.tensor([ids])).logits[0, -1].double() / temperature, -1)
                    tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
                    toks.append(tok)
                    lps.append(float(logp[tok]))
                    ids.append(tok)
                    if tok in (stop_token_ids or []):
                        break
                group.append((toks, lps))
            out.append(group)
        self.calls.append((self.version, out))
        return self.version, out


def _serve(engine):
    from gprl.serving.rollout_server import build_server

    srv = build_server(engine, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _commits(srv, transport):
    return srv.metrics.weight_commits.labels(transport=transport, result="ok")._value.get()


def _train(assets, out, transport, refuse_join=False):
    from gprl.trainer import Trainer

    engine = HFEngine(assets / "policy")
    srv = _serve(engine)
    if refuse_join:  # a server without the group routes (an older image): only HTTP reaches it
        from gprl.serving.weight_sync import CollectiveReceiver

        CollectiveReceiver.join = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no group here"))
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        spec = spec_for(assets, out, **{"rollout.server_urls": [url], "rollout.weight_sync.transport": transport,
                                        "output.report": False, "checkpoint.every_steps": 5})
        records = Trainer(spec, log=lambda *_: None).train()
        return engine, srv, records
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def restore_join():
    from gprl.serving.weight_sync import CollectiveReceiver

    join = CollectiveReceiver.join
    yield
    CollectiveReceiver.join = join


def test_collective_transport_trains_like_http(tiny_assets, tmp_path, capsys):
    """2 steps, fixed seed: the same completions at every call (so the same weights reached the server after each
    update) and the same losses; the collective run's pushes went over the gloo group, the HTTP run's did not."""
    http_engine, http_srv, http_rec = _train(tiny_assets, tmp_path / "http", "http")
    coll_engine, coll_srv, coll_rec = _train(tiny_assets, tmp_path / "collective", "collective")
    assert [v for v, _ in coll_engine.calls] == [v for v, _ in http_engine.calls]
    assert sorted({v for v, _ in coll_engine.calls}) == [0, 1] and coll_engine.version == http_engine.version == 2
    torch.testing.assert_close(dict(coll_engine.net.named_parameters()), dict(http_engine.net.named_parameters()),
                               rtol=0, atol=0)
    assert coll_engine.calls == http_engine.calls
    assert [r["loss"] for r in coll_rec] == [r["loss"] for r in http_rec]
    assert _commits(coll_srv, "collective") == 2 and _commits(coll_srv, "http") == 0
    assert _commits(http_srv, "http") == 2 and _commits(http_srv, "collective") == 0
    assert "weight-sync group (gloo, 127.0.0.1:" in capsys.readouterr().out


def test_a_server_that_cannot_join_is_pushed_over_http(tiny_assets, tmp_path, restore_join, capsys):
    http_engine, _, _ = _train(tiny_assets, tmp_path / "http", "http")
    engine, srv, _ = _train(tiny_assets, tmp_path / "fallback", "collective", refuse_join=True)
    assert engine.calls == http_engine.calls
    assert _commits(srv, "http") == 2 and _commits(srv, "collective") == 0
    assert "cannot join the weight-sync group" in capsys.readouterr().out


def test_a_restarted_server_is_resynced_then_rejoins_a_new_group(tiny_assets, toy_tokenizer, capsys):
    """The server restarts (same port, version 0) after a collective push: the next rollout's 409 re-pushes it
    over HTTP (a re-sync of one server), and the next update sees at begin that it left the group — before any
    tensor moves — and re-forms the group with it."""
    from transformers import AutoModelForCausalLM

    from gprl.config import RolloutSpec
    from gprl.distributed import free_port
    from gprl.rollout.remote import RemoteRollout
    from gprl.serving.rollout_server import build_server

    policy = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy")
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def start():
        srv = build_server(HFEngine(tiny_assets / "policy"), "127.0.0.1", port)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    srv = start()
    rollout = RemoteRollout([url], toy_tokenizer, RolloutSpec(max_new_tokens=2, weight_sync={"transport": "collective"}),
                            16, base_delay=0.01, attempts=20)
    try:
        rollout.sync_weights(policy, 1)
        first_group = rollout._sender.group_id
        assert _commits(srv, "collective") == 1
        srv.shutdown(); srv.server_close()
        srv = start()
        assert rollout.generate(["rock"], 2).policy_version == 1
        assert _commits(srv, "http") == 1 and _commits(srv, "collective") == 0
        with torch.no_grad():
            next(policy.parameters()).add_(0.01)
        rollout.sync_weights(policy, 2)
        assert _commits(srv, "collective") == 1 and rollout._sender.group_id != first_group
        engine_weights = dict(srv.store.engine.net.named_parameters())
        torch.testing.assert_close(dict(policy.named_parameters()), engine_weights, rtol=0, atol=0)
        assert "re-forming the weight-sync group" in capsys.readouterr().out
    finally:
        srv.shutdown(); srv.server_close()
