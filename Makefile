# The two commands of the README. Both set themselves up on a fresh machine.
VENV = $(shell scripts/bootstrap.sh)

.PHONY: help demo test test-fast k8s-tools dev-cluster images test-images test-trainer-image
demo:            ## the main job: a local GPRL run on CPU in the synthetic preference world
	$(VENV)/bin/gprl demo

test:            ## every test tier that runs on this machine (installs what it needs)
	scripts/test.sh

test-fast:       ## the fast tier only (no cluster, no slow runs)
	GPRL_FAST=1 scripts/test.sh -m "not slow and not cluster and not vllm and not deepspeed"

k8s-tools:       ## build/install kube-apiserver, controller-manager, scheduler, kwok, etcd, helm, promtool (cached)
	scripts/install-k8s-tools.sh

dev-cluster: k8s-tools  ## a local control plane with fake GPU nodes, for trying the operator with kubectl
	$(VENV)/bin/gprl dev-cluster

images:          ## build the operator and trainer images with buildah on a Debian base (root; docs/images.md)
	scripts/build-images.sh operator trainer

test-images: k8s-tools  ## build the operator image and run it against the test control plane
	scripts/test.sh -m images tests/cluster/test_operator_image.py

test-trainer-image:  ## build the trainer image (torch, several GB) and run a 2-step gprl train inside it
	scripts/test-trainer-image.sh

help:            ## list the targets
	@grep -E '^[a-z][a-z0-9-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):[^#]*## (.*)/\1\t\2/' | expand -t 18
