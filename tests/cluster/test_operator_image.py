"""The operator image, built here (`scripts/build-images.sh operator`: buildah on a Debian base made by mmdebstrap),
runs its operator against the test API server and reconciles a run.

The image's own Python, venv and packages run (`buildah run --isolation chroot`, as the image's non-root user
65532, host network, the chart's ServiceAccount token mounted read-only); only the kubelet is missing. Tier `images`
(needs root for buildah's chroot, and the Debian packages buildah + mmdebstrap, which the script installs):
`GPRL_IMAGES_REUSE=1` reuses an image already built instead of building it again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.request

import pytest

from gprl.devcluster.controlplane import kubeconfig_text
from gprl_k8s_testlib import OPERATOR_NS, OPERATOR_SA, ROOT, create_run, find_tool, free_port, get_run, \
    install_chart, wait_for

pytestmark = [pytest.mark.images, pytest.mark.slow]
BUILDAH = ["buildah", "--storage-driver", os.environ.get("GPRL_BUILDAH_DRIVER", "vfs")]


def _version() -> str:
    import re

    return re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)


@pytest.fixture(scope="module")
def operator_image(request):
    # a build takes minutes on a small machine: run when the tier is asked for (`make test-images`, -m images)
    if "images" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("images tier: run `make test-images` (or pytest -m images)")
    if os.geteuid() != 0:
        pytest.fail("the images tier needs root (buildah --isolation chroot)", pytrace=False)
    ref = f"localhost/gprl/operator:{_version()}"
    have = shutil.which("buildah") and subprocess.run([*BUILDAH, "inspect", "--type", "image", ref],
                                                      capture_output=True).returncode == 0
    if not (have and os.environ.get("GPRL_IMAGES_REUSE") == "1"):
        out = subprocess.run([str(ROOT / "scripts" / "build-images.sh"), "operator"], capture_output=True, text=True,
                             timeout=1800)
        assert out.returncode == 0, out.stderr[-4000:]
        assert out.stdout.strip().splitlines()[-1] == ref, out.stdout
    return ref


def test_operator_image_reconciles_a_run(control_plane, operator_image, namespace, tmp_path):
    cp = control_plane
    install_chart(cp, find_tool(cp, "helm"))
    # the chart's ServiceAccount token, readable by the image's user (the control plane's own dir is 0700);
    # mounted under /etc (in Debian /var/run is a symlink, and buildah's chroot mounts do not follow it)
    kube = tmp_path / "kube"
    kube.mkdir()
    shutil.copy(cp.ca_file, kube / "ca.crt")
    token = cp.service_account_token(OPERATOR_NS, OPERATOR_SA, create=False)
    (kube / "config").write_text(kubeconfig_text(cp.server, "/etc/gprl-kube/ca.crt",
                                                 f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}", token))
    for p in (kube, *kube.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    tmp_path.chmod(0o755)

    ctr = subprocess.run([*BUILDAH, "from", "--pull=never", operator_image], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    metrics, health = free_port(), free_port()
    log = open(tmp_path / "operator.log", "wb")
    # the image's entrypoint (python -m gprl_operator) with the flags the chart's env sets
    proc = subprocess.Popen(
        [*BUILDAH, "run", "--isolation", "chroot", "--user", "65532:65532",
         "-v", f"{kube}:/etc/gprl-kube:ro", "--env", "KUBECONFIG=/etc/gprl-kube/config", ctr, "--",
         "python", "-m", "gprl_operator", "--standalone", "--bind", "127.0.0.1",
         "--metrics-port", str(metrics), "--health-port", str(health)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy():
            assert proc.poll() is None, (tmp_path / "operator.log").read_text()[-4000:]
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2).status == 200
            except OSError:
                return False

        wait_for(healthy, 120, 0.5, what="the operator in the image answering /healthz")
        status, body = create_run(cp, namespace, "from-image", {"resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"}})
        assert status == 201, body
        job = f"/apis/batch/v1/namespaces/{namespace}/jobs/from-image"
        wait_for(lambda: cp.request_raw("GET", job, token=cp.admin_token)[0] == 200, 90, 0.5,
                 what=f"the run's Job, created by the operator in the image:\n{(tmp_path / 'operator.log').read_text()[-3000:]}")
        wait_for(lambda: ((get_run(cp, namespace, "from-image") or {}).get("status") or {}).get("phase"), 60, 0.5,
                 what="the run's status phase written by the operator in the image")
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        assert "gprl_operator_reconcile_total" in body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        subprocess.run([*BUILDAH, "rm", ctr], capture_output=True)
    # nothing of the operator outlives the container
    left = subprocess.run(["pgrep", "-f", f"--metrics-port {metrics}"], capture_output=True, text=True).stdout
    assert not left.strip(), left
