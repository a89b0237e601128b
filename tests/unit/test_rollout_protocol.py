"""The rollout server's HTTP protocol and the trainer-side client, with a fake engine (no vLLM): bucketed pushes,
versions on every rollout, 409 → re-push after a server restart, a push that loses its session starts over."""

import json
import threading
import time

import pytest
import torch


class FakeEngine:
    """Stands in for VLLMEngine: 'generates' the prompt's last token + version, holds the pushed weights; its
    manifest is the toy policy's."""

    default_manifest = None  # the toy policy's (set by the autouse fixture below)

    def __init__(self, version=0, manifest=None):
        self.version, self.model, self.weights, self.loads = version, "fake", {}, 0
        self.manifest = manifest or FakeEngine.default_manifest

    def weight_manifest(self):
        return self.manifest

    def generate_ids(self, prompt_ids, n, **kw):
        out = [[([p[-1] + self.version, 1], [-0.5, -0.25]) for _ in range(n)] for p in prompt_ids]
        return self.version, out

    def load_weights(self, weights, version):
        self.weights = {k: v.clone() for k, v in weights}
        self.version, self.loads = version, self.loads + 1


@pytest.fixture(autouse=True, scope="module")
def _toy_manifest(toy_backbone_config):
    from transformers import LlamaForCausalLM

    from gprl.serving.weights import manifest_of

    with torch.device("meta"):
        FakeEngine.default_manifest = manifest_of(LlamaForCausalLM(toy_backbone_config))


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
        assert status == 409 and json.loads(body)["version"] == 2
    finally:
        srv.shutdown(); srv.server_close()


def test_two_ranks_resyncing_a_restarted_server_to_the_same_version_both_succeed(policy, toy_tokenizer):
    """ZeRO 0-2: each learner rank re-pushes to a server that answered 409. Rank 1 (never pushed before: a rewinding
    push) commits version 2 while rank 0's push of version 2 is in flight; rank 0's commit must count as done."""
    engine = FakeEngine()
    srv = serve(engine)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        rank0, rank1 = client(url, toy_tokenizer), client(url, toy_tokenizer)
        rank0._pushed_to.add(url)  # rank 0 pushed to this URL before the server restarted
        real_post, raced = rank0._post, {"done": False}

        def racing_post(u, path, payload=None, **kw):
            if path.startswith("/weights/commit") and not raced["done"]:
                raced["done"] = True
                rank1.push(url, policy, 2)  # rank 1's whole re-push lands first
            return real_post(u, path, payload, **kw)

        rank0._post = racing_post
        assert rank0.push(url, policy, 2)["version"] == 2
        assert raced["done"] and engine.version == 2 and engine.loads == 1
    finally:
        srv.shutdown(); srv.server_close()


class Zero3Learner:
    """Stands in for a ZeRO-3 DeepSpeed learner: whole parameters only inside `gathered_parameters(params)`; records
    how many parameters each gather held."""

    collective_gather = True

    def __init__(self):
        self.gathers, self.inside = [], False

    def gathered_parameters(self, params=None):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            assert not self.inside, "nested gather"
            assert params is not None, "a push must gather one module's parameters, not the whole model"
            self.gathers.append(sum(p.numel() for p in params))
            self.inside = True
            try:
                yield
            finally:
                self.inside = False

        return ctx()


def _modules_with_parameters(policy) -> int:
    seen, n = set(), 0
    for m in policy.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        n += bool(own)
    return n


def test_zero3_pushes_gather_layer_by_layer_and_resync_a_restarted_server_collectively(policy, toy_tokenizer):
    """ZeRO-3: a push to several servers is one walk over the policy, one module gathered at a time (never the
    whole model), each tensor sent on to both servers; a restarted server is found by GET /info at the start of
    generate and re-synced by one more walk (the collective path; gdist's collectives are no-ops in one
    process)."""
    from gprl.config import RolloutSpec
    from gprl.distributed import free_port
    from gprl.rollout.remote import RemoteRollout

    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    engines = [FakeEngine(), FakeEngine()]
    servers = [serve(e, p) for e, p in zip(engines, ports)]
    learner = Zero3Learner()
    rollout = RemoteRollout(urls, toy_tokenizer, RolloutSpec(max_new_tokens=4), 16, learner=learner, bucket_mb=0.05,
                            log=lambda *_: None, base_delay=0.01, attempts=5)
    walk = _modules_with_parameters(policy)
    total = sum(p.numel() for p in policy.parameters())
    try:
        rollout.sync_weights(policy, 1)
        assert [e.version for e in engines] == [1, 1] and len(learner.gathers) == walk
        assert max(learner.gathers) < total / 4  # one module at a time
        for e in engines:
            assert list(e.weights) == [n for n, _ in policy.named_parameters()]
            for k, v in policy.named_parameters():
                torch.testing.assert_close(e.weights[k], v.detach())
        assert rollout.generate(["rock", "x y"], 2).policy_version == 1
        assert len(learner.gathers) == walk  # every server at version 1: nothing to re-sync

        servers[1].shutdown(); servers[1].server_close()  # server 1 "restarts" at version 0
        engines[1] = FakeEngine()
        servers[1] = serve(engines[1], ports[1])
        batch = rollout.generate(["rock", "x y"], 2)
        assert batch.policy_version == 1 and batch.sequences.shape[0] == 4
        assert engines[1].version == 1 and engines[1].loads == 1 and engines[0].loads == 1  # only the stale one
        assert len(learner.gathers) == 2 * walk
    finally:
        for srv in servers:
            srv.shutdown(); srv.server_close()


def test_zero3_generation_fails_clearly_when_a_server_keeps_falling_behind(policy, toy_tokenizer):
    from gprl.config import RolloutSpec
    from gprl.rollout import StaleRollout
    from gprl.rollout.remote import RESYNC_ROUNDS, RemoteRollout

    engine = FakeEngine()
    srv = serve(engine)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    learner = Zero3Learner()
    rollout = RemoteRollout([url], toy_tokenizer, RolloutSpec(max_new_tokens=4), 16, learner=learner,
                            log=lambda *_: None, base_delay=0.01, attempts=5)
    real_generate = engine.generate_ids

    def forgetful(*a, **kw):  # the server "restarts" between every re-sync and the generation
        engine.version = 0
        return real_generate(*a, **kw)

    engine.generate_ids = forgetful
    try:
        rollout.sync_weights(policy, 2)
        with pytest.raises(StaleRollout, match=f"still behind after {RESYNC_ROUNDS} collective re-syncs"):
            rollout.generate(["rock"], 2)
        # the first round finds the server current; each later round re-syncs it (one walk each)
        assert len(learner.gathers) == (1 + (RESYNC_ROUNDS - 1)) * _modules_with_parameters(policy)
    finally:
        srv.shutdown(); srv.server_close()


# ---------------------------------------------------------------- checked commits


def _post(url, path, payload=b""):
    from gprl.serving.http import request

    status, _, body = request(url + path, payload, method="POST")
    return status, json.loads(body)


def _bucket(tensors) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def test_refused_pushes_leave_the_engine_on_its_previous_version(policy):
    """Partial, wrong-shape, wrong-dtype, non-finite, cut-off, backwards and foreign-session pushes are refused
    before the engine is touched; a complete push then commits."""
    engine = FakeEngine(version=3)
    srv = serve(engine)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    weights = {k: v.detach().clone() for k, v in policy.named_parameters()}
    names = list(weights)
    try:
        def begin(version=4):
            status, out = _post(url, f"/weights/begin?version={version}")
            assert status == 200, out
            return out["session"]

        def unchanged():
            assert engine.version == 3 and engine.loads == 0

        # partial: one tensor, then commit
        s = begin()
        assert _post(url, f"/weights/bucket?session={s}", _bucket({names[0]: weights[names[0]]}))[0] == 200
        status, out = _post(url, f"/weights/commit?session={s}")
        assert status == 422 and "incomplete push" in out["error"] and out["version"] == 3
        unchanged()
        # wrong shape mid-push: the bucket is refused and the session dropped (its commit is unknown)
        s = begin()
        assert _post(url, f"/weights/bucket?session={s}", _bucket({names[0]: weights[names[0]]}))[0] == 200
        status, out = _post(url, f"/weights/bucket?session={s}", _bucket({names[1]: torch.zeros(3, 3)}))
        assert status == 422 and "shape (3, 3)" in out["error"]
        assert _post(url, f"/weights/commit?session={s}")[0] == 404
        unchanged()
        for bad, why in ((weights[names[1]].double(), "dtype torch.float64"),
                         (weights[names[1]].clone().fill_(float("nan")), "NaN"),
                         (weights[names[1]].clone().fill_(float("inf")), "NaN or infinite")):
            s = begin()
            status, out = _post(url, f"/weights/bucket?session={s}", _bucket({names[1]: bad}))
            assert status == 422 and why in out["error"], out
        status, out = _post(url, f"/weights/bucket?session={begin()}", _bucket({"not.a.param": torch.zeros(1)}))
        assert status == 422 and "not a parameter" in out["error"]
        # an upload cut off mid-send: not a safetensors buffer
        status, out = _post(url, f"/weights/bucket?session={begin()}", _bucket(weights)[:-100])
        assert status == 400 and "safetensors" in out["error"]
        # backwards and equal versions; a session this server never opened
        assert _post(url, "/weights/begin?version=2")[0] == 409
        assert _post(url, "/weights/begin?version=3")[0] == 409
        assert _post(url, "/weights/commit?session=" + "0" * 32)[0] == 404
        unchanged()
        # a complete push commits; a resumed learner (rewind) may then go back
        s = begin(5)
        for k in names:
            assert _post(url, f"/weights/bucket?session={s}", _bucket({k: weights[k]}))[0] == 200
        status, out = _post(url, f"/weights/commit?session={s}")
        assert status == 200 and out["version"] == 5 and engine.loads == 1
        assert _post(url, "/weights/begin?version=4&rewind=true")[0] == 200
        assert srv.store.staged_bytes == 0
    finally:
        srv.shutdown(); srv.server_close()


def test_abandoned_sessions_expire_and_free_their_memory(policy):
    from gprl.serving.rollout_server import build_server

    engine = FakeEngine()
    srv = build_server(engine, "127.0.0.1", 0, session_ttl_s=0.5)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    weights = {k: v.detach() for k, v in policy.named_parameters()}
    try:
        s = _post(url, "/weights/begin?version=1")[1]["session"]
        assert _post(url, f"/weights/bucket?session={s}", _bucket(weights))[0] == 200
        assert srv.store.staged_bytes > 0
        deadline = time.monotonic() + 5
        while srv.store.staged_bytes and time.monotonic() < deadline:
            time.sleep(0.05)  # nobody calls: the reaper frees it
        assert srv.store.staged_bytes == 0 and not srv.store.sessions
        assert _post(url, f"/weights/commit?session={s}")[0] == 404 and engine.version == 0
        from gprl.serving.http import request

        text = request(url + "/metrics")[2].decode()
        assert "gprl_rollout_weight_sessions_expired_total 1.0" in text
        assert "gprl_rollout_weight_staged_bytes 0.0" in text
    finally:
        srv.shutdown(); srv.server_close()


def test_a_failed_engine_load_takes_the_server_out_of_rotation_until_a_whole_push(policy, toy_tokenizer):
    from gprl.serving.http import request

    engine = FakeEngine()
    real = engine.load_weights
    engine.load_weights = lambda weights, version: (_ for _ in ()).throw(RuntimeError("device lost"))
    srv = serve(engine)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        rollout = client(url, toy_tokenizer)
        with pytest.raises(Exception, match="device lost"):
            rollout.sync_weights(policy, 1)
        assert request(url + "/readyz")[0] == 503
        assert request(url + "/generate", {"prompt_ids": [[4]], "max_tokens": 2})[0] == 503
        engine.load_weights = real
        rollout.sync_weights(policy, 1)  # a later whole push recovers
        assert engine.version == 1 and request(url + "/readyz")[0] == 200
    finally:
        srv.shutdown(); srv.server_close()


def test_the_client_sends_the_token_and_casts_to_the_engines_dtype(policy, toy_tokenizer):
    from gprl.config import RolloutSpec
    from gprl.rollout.remote import RemoteRollout
    from gprl.serving.rollout_server import build_server
    from gprl.serving.weights import manifest_of

    with torch.device("meta"):
        engine = FakeEngine(manifest=manifest_of(policy, torch.bfloat16))
    token = "k" * 32
    srv = build_server(engine, "127.0.0.1", 0, token=token)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        anonymous = RemoteRollout([url], toy_tokenizer, RolloutSpec(max_new_tokens=4), 16, log=lambda *_: None,
                                  base_delay=0.01, attempts=2)
        from gprl.serving.http import ServerError

        with pytest.raises(ServerError, match="HTTP 401"):
            anonymous.sync_weights(policy, 1)
        rollout = RemoteRollout([url], toy_tokenizer, RolloutSpec(max_new_tokens=4), 16, log=lambda *_: None,
                                base_delay=0.01, attempts=2, token=token)
        rollout.sync_weights(policy, 1)
        assert engine.version == 1 and all(t.dtype == torch.bfloat16 for t in engine.weights.values())
        assert rollout.generate(["rock"], 2).policy_version == 1
    finally:
        srv.shutdown(); srv.server_close()


def test_a_gloo_push_commits_the_same_weights_as_http_and_a_bad_one_leaves_the_version(policy):
    """The torch.distributed transport (learner rank 0 + 2 servers in one gloo group): one broadcast reaches both
    servers, under the same checked, versioned commit; a non-finite tensor is received (the collective completes)
    and the commit refused."""
    from gprl.serving.weight_sync import CollectiveSender

    engines = [FakeEngine(), FakeEngine()]
    servers = [serve(e) for e in engines]
    urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    weights = {k: v.detach() for k, v in policy.named_parameters()}
    order = list(FakeEngine.default_manifest)
    try:
        sender = CollectiveSender({})
        assert sender.form(urls) == urls
        out = sender.push(weights, 1, order)
        assert [o["version"] for o in out] == [1, 1] and [e.version for e in engines] == [1, 1]
        for e in engines:
            for k, v in weights.items():
                torch.testing.assert_close(e.weights[k], v)
        bad = dict(weights)
        bad[order[2]] = torch.full_like(weights[order[2]], float("nan"))
        from gprl.serving.http import ServerError

        with pytest.raises(ServerError, match="NaN"):
            sender.push(bad, 2, order)
        assert [e.version for e in engines] == [1, 1] and [e.loads for e in engines] == [1, 1]
        assert sender.push(weights, 3, order)[1]["version"] == 3  # the group is still usable
    finally:
        for s in servers:
            s.shutdown(); s.server_close()


class InPlaceEngine(FakeEngine):
    """Writes each tensor into its weights as the iterator yields it (as vLLM's reload does), so a push that fails
    part-way leaves a mix unless the store rolls back; records when the first tensor reached it."""

    def __init__(self, weights):
        super().__init__()
        self.weights = {k: v.clone() for k, v in weights.items()}
        self.first_tensor_at = None

    def load_weights(self, weights, version):
        self.first_tensor_at = None
        for name, t in weights:
            if self.first_tensor_at is None:
                self.first_tensor_at = time.monotonic()
            self.weights[name].copy_(t)
        self.version, self.loads = version, self.loads + 1


def test_a_streamed_gloo_push_overlaps_the_load_and_a_failed_one_rolls_back(policy, toy_tokenizer):
    """rollout.weightSync.streamLoad: the first push is staged (nothing to roll back to yet); later ones stream —
    the engine loads the first tensor before the learner has sent the last — and a push refused part-way (a NaN
    tensor) reloads the previous version, bitwise, on both servers."""
    from gprl.serving.http import ServerError
    from gprl.serving.rollout_server import build_server
    from gprl.serving.weight_sync import CollectiveSender

    start = {k: v.detach().clone() for k, v in policy.named_parameters()}
    engines = [InPlaceEngine(start), InPlaceEngine(start)]
    servers = []
    for e in engines:
        srv = build_server(e, "127.0.0.1", 0, stream_load=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    order = list(FakeEngine.default_manifest)

    def weights(seed):
        g = torch.Generator().manual_seed(seed)
        return {k: torch.randn(v.shape, generator=g) for k, v in start.items()}

    try:
        sender = CollectiveSender({})
        assert sender.form(urls) == urls
        out = sender.push(weights(1), 1, order)
        assert [o.get("streamed") for o in out] == [None, None]  # staged: no version kept yet
        # streamed, slowed down on the learner's side so that the overlap is visible
        sender.begin(2)
        w2 = weights(2)
        for name in order[:-1]:
            sender.send(w2[name]); time.sleep(0.01)
        last_sent_at = time.monotonic()
        sender.send(w2[order[-1]])
        out = sender.commit()
        assert [o["version"] for o in out] == [2, 2] and all(o["streamed"] for o in out)
        for e in engines:
            assert e.first_tensor_at < last_sent_at
            for k in order:
                assert torch.equal(e.weights[k], w2[k])
        # refused part-way: the first tensors were already in the engine; the store reloads version 2
        bad = weights(3)
        bad[order[len(order) // 2]][0] = float("nan")
        with pytest.raises(ServerError, match="NaN"):
            sender.push(bad, 3, order)
        for e in engines:
            assert e.version == 2
            for k in order:
                assert torch.equal(e.weights[k], w2[k]), k
        assert [s.store.staged_bytes for s in servers] == [0, 0]
        # and the group goes on: the next push streams
        out = sender.push(weights(4), 4, order)
        assert [o["version"] for o in out] == [4, 4] and all(o["streamed"] for o in out)
    finally:
        for s in servers:
            s.shutdown(); s.server_close()


def _streaming_server(policy):
    """A loopback serve-rollout with streamed loads into an InPlaceEngine holding the policy's weights."""
    from gprl.serving.rollout_server import build_server

    start = {k: v.detach().clone() for k, v in policy.named_parameters()}
    engine = InPlaceEngine(start)
    srv = build_server(engine, "127.0.0.1", 0, stream_load=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return start, engine, srv, f"http://127.0.0.1:{srv.server_address[1]}", list(FakeEngine.default_manifest)


def test_streamed_pushes_receive_into_the_buffers_of_the_commit_before_last(policy):
    """The commit before last's tensors are no longer a rollback target: the next push is received into them (no
    fresh memory, no page faults), the engine still ends on each pushed version, and a refused push still reloads
    the last committed one bitwise."""
    from gprl.serving.http import ServerError
    from gprl.serving.weight_sync import CollectiveSender

    start, engine, srv, url, order = _streaming_server(policy)
    w = [{k: torch.full(v.shape, float(i)) for k, v in start.items()} for i in range(6)]
    ptrs = lambda: {n: t.data_ptr() for n, t in srv.store.kept.items()}  # noqa: E731
    try:
        sender = CollectiveSender({})
        sender.form([url])
        kept = []
        for v in (1, 2, 3, 4):  # 1 staged, then streamed
            sender.push(w[v], v, order)
            kept.append(ptrs())
            assert engine.version == v and all(torch.equal(engine.weights[k], w[v][k]) for k in order)
            assert all(torch.equal(srv.store.kept[k], w[v][k]) for k in order)
        assert kept[2] == kept[0] and kept[3] == kept[1]  # 3 into 1's memory, 4 into 2's
        bad = dict(w[5]); bad[order[-1]] = bad[order[-1]].clone(); bad[order[-1]][0] = float("nan")
        with pytest.raises(ServerError, match="NaN"):
            sender.push(bad, 5, order)
        assert engine.version == 4 and all(torch.equal(engine.weights[k], w[4][k]) for k in order)
        assert sender.push(w[5], 5, order)[0]["version"] == 5 and torch.equal(engine.weights[order[0]], w[5][order[0]])
    finally:
        srv.shutdown(); srv.server_close()


def test_a_streamed_push_whose_commit_never_comes_reloads_within_the_group_timeout(policy):
    """A learner that dies after its last tensor breaks no collective: the streamed load must give up after the
    group's timeout (not the session's 300 s idle expiry), reload the previous weights, refuse a late commit, and
    leave nothing of the session in the receiver."""
    from gprl.serving.http import ServerError
    from gprl.serving.weight_sync import CollectiveSender

    start, engine, srv, url, order = _streaming_server(policy)
    w = [{k: torch.full(v.shape, float(i)) for k, v in start.items()} for i in range(3)]
    try:
        sender = CollectiveSender({}, timeout_s=2.0)
        sender.form([url])
        sender.push(w[1], 1, order)  # staged; version 1 is kept
        sender.begin(2)
        for name in order:
            sender.send(w[2][name])
        last = order[-1]

        def wait_for(i):
            t0 = time.monotonic()
            while not torch.equal(engine.weights[last], w[i][last]) and time.monotonic() - t0 < 30:
                time.sleep(0.02)
            return time.monotonic() - t0

        wait_for(2)  # the whole of version 2 is in the engine, waiting for a commit that does not come
        waited = wait_for(1)  # then version 1 is reloaded: after the group's 2 s, not the session's 300 s
        assert 1.0 < waited < 10, waited
        assert engine.version == 1 and all(torch.equal(engine.weights[k], w[1][k]) for k in order)
        with pytest.raises(ServerError, match="no commit within"):
            sender.commit()
        assert srv.receiver._receiving == {} and srv.receiver._commits == {} and srv.receiver._errors == {}
        out = sender.push(w[2], 2, order)  # the group goes on
        assert out[0]["version"] == 2 and engine.version == 2
        # an aborted streamed push: rolled back to 2, and forgotten by the receiver at the next push
        sender.begin(3)
        for name in order:
            sender.send(w[0][name])
        wait_for(0)
        sender.abort()
        wait_for(2)
        time.sleep(0.5)  # the load thread ends after its rollback
        assert sender.push(w[1], 4, order)[0]["version"] == 4
        assert srv.receiver._receiving == {} and srv.receiver._commits == {} and srv.receiver._errors == {}
    finally:
        srv.shutdown(); srv.server_close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finiteness_check_is_exact_when_the_sum_overflows(dtype):
    """The commit's NaN/inf check sums first: a finite tensor whose sum overflows must still pass, and a NaN or
    an infinity anywhere (also +inf and -inf together) must still fail."""
    from gprl.serving.weights import _finite

    big = torch.finfo(dtype).max
    assert _finite(torch.full((8,), big, dtype=dtype))  # the sum is inf; the elements are finite
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        t = torch.ones(1000, dtype=dtype)
        t[: len(bad)] = torch.tensor(bad, dtype=dtype)
        assert not _finite(t), bad
