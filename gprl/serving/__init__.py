"""Servers of the disaggregated topology: GPM scoring (`gprl serve-gpm`) and vLLM rollouts (`gprl serve-rollout`),
and the clients the trainer uses to reach them. Standard library HTTP (no web framework needed)."""
