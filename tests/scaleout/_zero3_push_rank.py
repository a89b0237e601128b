"""One rank of the ZeRO-3 layer-wise push test (launched by torchrun from test_zero3_push.py): a DeepSpeed ZeRO-3
learner takes one step, then pushes its policy to a rollout server on loopback (rank 0 hosts it) over HTTP and
over the gloo group; rank 0 saves what the server received, the consolidated state dict and the gathers' sizes."""

import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import equivalence_spec, fixed_batch, shard  # noqa: E402


class Engine:
    """Holds what a push committed (the rollout server's engine, without vLLM)."""

    model = "recorder"

    def __init__(self, manifest):
        self.manifest, self.version, self.pushes = manifest, 0, []

    def weight_manifest(self):
        return self.manifest

    def generate_ids(self, prompt_ids, n, **kw):
        return self.version, [[([1], [-0.1])] * n for _ in prompt_ids]

    def load_weights(self, weights, version):
        self.pushes.append({k: v.clone() for k, v in weights})
        self.version = version


def main(policy_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from gprl import distributed as gdist
    from gprl.algo.drift import Control
    from gprl.config import RolloutSpec
    from gprl.learner.deepspeed_learner import DeepSpeedLearner
    from gprl.rollout.remote import RemoteRollout
    from gprl.serving.rollout_server import build_server
    from gprl.serving.weights import manifest_of

    spec = equivalence_spec(policy_dir, 3)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(policy_dir).eval().requires_grad_(False)
    manifest = manifest_of(policy)
    learner = DeepSpeedLearner(policy, reference, spec)
    rank, world = gdist.rank(), gdist.world_size()
    batch, adv = fixed_batch(policy.config.vocab_size, seed=0)
    control = Control(weights=[1.0, 1.0, 1.0], kl_coef=spec.algo.kl_coef, eps_low=0.2, eps_high=0.2)
    learner.update(*shard(batch, adv, rank, world), control)

    engine = server = None
    if rank == 0:
        engine = Engine(manifest)
        server = build_server(engine, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    url = gdist.broadcast_object(f"http://127.0.0.1:{server.server_address[1]}" if rank == 0 else None)

    gathers = []
    real = learner.gathered_parameters

    def counted(params=None):  # the size of every gather a push makes
        gathers.append(sum(p.ds_numel for p in (params if params is not None else policy.parameters())))
        return real(params)

    learner.gathered_parameters = counted
    for version, transport in ((1, "http"), (2, "collective")):
        ro = RolloutSpec(max_new_tokens=2, weight_sync={"transport": transport})
        client = RemoteRollout([url], None, ro, 16, learner=learner, bucket_mb=1.0, log=print)
        client.sync_weights(policy, version)
    learner.gathered_parameters = real
    state = learner.full_state_dict()
    if rank == 0:
        commits = {t: server.metrics.weight_commits.labels(transport=t, result="ok")._value.get()
                   for t in ("http", "collective")}
        torch.save({"pushes": engine.pushes, "state": state, "gathers": gathers, "world": world, "commits": commits,
                    "total": sum(s.nbytes // s.dtype.itemsize for s in manifest.values())}, out)
        server.shutdown()
    gdist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
