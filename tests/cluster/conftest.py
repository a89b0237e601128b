"""A real control plane for the tests in tests/cluster: etcd + kube-apiserver + kube-controller-manager +
kube-scheduler + kwok, one per session, torn down by PID. Binaries: scripts/install-k8s-tools.sh."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from gprl.devcluster import BinariesMissing, ControlPlane

HERE = Path(__file__).parent
FAKE_GPU_NODE = "gpu-node-0"
GPUS_PER_NODE = 8


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs the real kube-apiserver + etcd control plane "
                                       "(scripts/install-k8s-tools.sh)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def control_plane():
    """The running ControlPlane: ``.kubeconfig`` (admin), ``.admin_token``, ``.server``, ``.ca_file``,
    ``.unprivileged_token``; one fake kwok node ``gpu-node-0`` with 8 ``nvidia.com/gpu``."""
    try:
        cp = ControlPlane(controller_manager=True, scheduler=True, kwok=True)
    except BinariesMissing as e:  # fail loudly: a missing toolchain must not look like a green run
        pytest.fail(f"{e}\n(then rerun: python -m pytest tests/cluster)", pytrace=False)
    with cp:
        cp.create_fake_node(FAKE_GPU_NODE, gpus=GPUS_PER_NODE)
        cp.wait_node_ready(FAKE_GPU_NODE)
        yield cp


@pytest.fixture(scope="session")
def k8s_api_client(control_plane):
    """A ``kubernetes.client.ApiClient`` authenticated as the admin (group system:masters)."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=control_plane.kubeconfig)
    yield api
    api.close()


@pytest.fixture
def namespace(control_plane):
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.ensure_namespace(name)
    yield name
    control_plane.request_raw("DELETE", f"/api/v1/namespaces/{name}", token=control_plane.admin_token)
