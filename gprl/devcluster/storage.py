"""Volumes for the dev cluster: a default StorageClass and a small provisioner that gives each of its claims a
PersistentVolume of the size asked for, the way a cloud's CSI driver would (local-path-provisioner's role on kind).

There is no kubelet, so nothing is ever mounted: the PVs are hostPath objects under the dev cluster's work directory,
enough for the API-level lifecycle a run needs (claim -> Bound -> pods scheduled -> run deleted -> PV deleted).
Standard library only, like the rest of ``gprl.devcluster``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

STORAGE_CLASS = "standard"  # the name kind and minikube give their default class, which examples often ask for
PROVISIONER = "dev-cluster.gprl.dev/hostpath"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"


def storage_class() -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": True,
    }


def volume_for(claim: dict, root: Path) -> dict[str, Any]:
    """The PersistentVolume that satisfies ``claim``: its size and access modes, pre-bound to it by claimRef."""
    meta, spec = claim["metadata"], claim["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": spec.get("volumeMode", "Filesystem"),
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                         "name": meta["name"], "uid": meta["uid"]},
            "hostPath": {"path": str(root / f"{meta['namespace']}-{meta['name']}"), "type": "DirectoryOrCreate"},
        },
    }


class DevProvisioner:
    """Polls the claims of :data:`STORAGE_CLASS` (every ``interval`` s) and creates their volumes; deletes the
    volumes it made once released. ``cp`` is a :class:`~gprl.devcluster.ControlPlane`."""

    def __init__(self, cp, root: Path | None = None, interval: float = 1.0):
        self.cp, self.interval = cp, interval
        self.root = Path(root or (Path(cp.workdir) / "volumes"))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def start(self) -> "DevProvisioner":
        self.cp.apply(storage_class())
        self._thread = threading.Thread(target=self._loop, name="gprl-dev-provisioner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def __enter__(self) -> "DevProvisioner":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:  # noqa: BLE001 - a hiccup of the API server must not end the provisioner
                self.errors = (self.errors + [str(exc)])[-20:]
            self._stop.wait(self.interval)

    def sync_once(self) -> None:
        volumes = self.cp.request("GET", "/api/v1/persistentvolumes")["items"]
        claimed = {(v["spec"].get("claimRef") or {}).get("uid") for v in volumes}
        for claim in self.cp.request("GET", "/api/v1/persistentvolumeclaims")["items"]:
            spec, meta = claim["spec"], claim["metadata"]
            if spec.get("storageClassName") != STORAGE_CLASS or spec.get("volumeName") or meta["uid"] in claimed \
                    or meta.get("deletionTimestamp"):
                continue
            status, body = self.cp.request_raw("POST", "/api/v1/persistentvolumes", volume_for(claim, self.root),
                                               token=self.cp.admin_token)
            if status not in (201, 409):
                self.errors = (self.errors + [f"PV for {meta['namespace']}/{meta['name']}: HTTP {status} {body}"])[-20:]
        for v in volumes:
            mine = (v["metadata"].get("annotations") or {}).get(PROVISIONED_BY) == PROVISIONER
            if mine and (v.get("status") or {}).get("phase") == "Released" \
                    and v["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                self.cp.request_raw("DELETE", f"/api/v1/persistentvolumes/{v['metadata']['name']}",
                                    token=self.cp.admin_token)
