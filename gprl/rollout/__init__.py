"""Generation backends behind one protocol: G samples per prompt with their log-probs."""

from gprl.rollout.base import RolloutBackend, RolloutBatch, StaleRollout
from gprl.rollout.hf import HFRollout

__all__ = ["RolloutBackend", "RolloutBatch", "StaleRollout", "HFRollout", "make_rollout"]


def make_rollout(spec, policy, tokenizer, learner=None):
    """The backend `spec.rollout` names: HF in-process (default); vLLM colocated (engine in this process);
    vLLM servers (`gprl serve-rollout`) when rollout.server_urls is set."""
    ro = spec.rollout
    if ro.server_urls:
        from gprl.rollout.remote import RemoteRollout

        return RemoteRollout(ro.server_urls, tokenizer, ro, spec.data.max_prompt_tokens, learner=learner)
    if ro.backend == "vllm":
        from gprl.rollout.vllm import VLLMRollout

        return VLLMRollout.colocated(spec, policy, tokenizer, learner=learner)
    zero3 = spec.learner.backend == "deepspeed" and spec.learner.zero_stage == 3
    return HFRollout(policy, tokenizer, ro, spec.data.max_prompt_tokens, synced_gpus=zero3,
                     share_prompt=spec.model.share_prompt)
