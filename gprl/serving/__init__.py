"""Servers of the disaggregated topology: GPM scoring (`gprl serve-gpm`) and vLLM rollouts (`gprl serve-rollout`),
on FastAPI/uvicorn with a per-run bearer token (app.py, auth.py), checked weight commits (weights.py), and the
clients the trainer uses to reach them."""
