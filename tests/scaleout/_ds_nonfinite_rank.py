"""One rank of the DeepSpeed non-finite-update test (launched by torchrun from test_deepspeed.py): three updates,
the second with a NaN advantage on the last rank only."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import equivalence_spec, fixed_batch, shard  # noqa: E402


def main(policy_dir: str, out: str, stage: int) -> None:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from gprl import distributed as gdist
    from gprl.algo.drift import Control
    from gprl.learner.deepspeed_learner import DeepSpeedLearner

    spec = equivalence_spec(policy_dir, stage)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(policy_dir).eval().requires_grad_(False)
    learner = DeepSpeedLearner(policy, reference, spec)
    rank, world = gdist.rank(), gdist.world_size()
    control = Control(weights=[1.0, 1.0, 1.0], kl_coef=spec.algo.kl_coef, eps_low=0.2, eps_high=0.2)
    skipped, states, error = [], [], None
    for step in range(3):
        batch, adv = fixed_batch(policy.config.vocab_size, seed=step)
        b, a = shard(batch, adv, rank, world)
        if step == 1 and rank == world - 1:
            a = a.clone()
            a[0] = float("nan")
        try:
            skipped.append(learner.update(b, a, control).skipped)
        except FloatingPointError as exc:
            error = str(exc)
            break
        state = learner.full_state_dict()  # collective; rank 0 gets it
        if rank == 0:
            states.append({k: v.float().clone() for k, v in state.items()})
    if rank == 0:
        torch.save({"skipped": skipped, "states": states, "error": error}, out)
    gdist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
