"""A local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok) for tests and
``gprl dev-cluster``. Standard library only; binaries from scripts/install-k8s-tools.sh."""

from gprl.devcluster.controlplane import (
    DEFAULT_K8S_VERSION,
    ApiError,
    BinariesMissing,
    ControlPlane,
    ControlPlaneError,
    find_bin_dir,
    main,
    run_dev_cluster,
)

__all__ = ["DEFAULT_K8S_VERSION", "ApiError", "BinariesMissing", "ControlPlane", "ControlPlaneError",
           "find_bin_dir", "main", "run_dev_cluster"]
