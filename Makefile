# The two commands of the README. Both set themselves up on a fresh machine.
VENV = $(shell scripts/bootstrap.sh)

.PHONY: demo test test-fast
demo:            ## the main job: a local GPRL run on CPU in the synthetic preference world
	$(VENV)/bin/gprl demo

test:            ## every test tier that runs on this machine (installs what it needs)
	scripts/test.sh

test-fast:       ## the fast tier only (no cluster, no slow runs)
	scripts/test.sh -m "not slow and not cluster and not vllm and not deepspeed"
