"""One rank of the DeepSpeed-vs-torch equivalence test (launched by torchrun from test_deepspeed.py)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import equivalence_spec, fixed_batch, shard  # noqa: E402


def main(policy_dir: str, out: str, stage: int, offload: bool) -> None:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from gprl import distributed as gdist
    from gprl.algo.drift import Control
    from gprl.learner.deepspeed_learner import DeepSpeedLearner

    spec = equivalence_spec(policy_dir, stage, offload)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(policy_dir).eval().requires_grad_(False)
    learner = DeepSpeedLearner(policy, reference, spec)
    rank, world = gdist.rank(), gdist.world_size()
    control = Control(weights=[1.0, 1.0, 1.0], kl_coef=spec.algo.kl_coef, eps_low=0.2, eps_high=0.2)
    stats = []
    for step in range(3):
        batch, adv = fixed_batch(policy.config.vocab_size, seed=step)
        b, a = shard(batch, adv, rank, world)
        stats.append(learner.update(b, a, control).__dict__)
    state = learner.full_state_dict()
    if rank == 0:
        torch.save({"stats": stats, "state": {k: v.float() for k, v in state.items()}, "world": world}, out)
    gdist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
