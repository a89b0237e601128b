"""GPRLRun manifests, good and bad, shared by the offline check (`gprl config`, tests/unit/test_api.py) and the
real API server (tests/cluster/test_crd_validation.py): both must give the same verdict on each, naming `field`.

(id, metadata.name, spec, field) -- field None: valid. A spec is what kubectl would send after reading the YAML
(YAML 1.1: a bare `off` arrives as the boolean false).
"""

N47 = "r" + "x" * 46  # the longest colocated name
N44 = "d" + "x" * 43  # the longest disaggregated name
DIS = {"topology": "disaggregated"}
# Every run names its sources (the API server refuses one that does not, gprl.api.manifest.RULES). `manifest` adds
# these under a case's spec; a case's own value wins, and None removes the field.
SOURCES = {"model": {"policy": "org/policy"}, "gpm": {"path": "org/gpm"}, "data": {"prompts": "prompts.jsonl"}}


def with_sources(spec: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in SOURCES.items()}
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return {k: ({f: x for f, x in v.items() if x is not None} if isinstance(v, dict) else v) for k, v in out.items()}


VALID = [
    ("ok-longest-colocated", N47, {}, None),
    ("ok-longest-disaggregated", N44, {"resources": DIS}, None),
    ("ok-quantities", "ok-q", {"resources": {"cpu": 2, "memory": "512Mi", "checkpointSize": "1Gi"}}, None),
    ("ok-millicpu", "ok-m", {"resources": {"cpu": "500m", "memory": 8589934592}}, None),
    ("ok-names", "ok-n", {"resources": {"envFromSecrets": ["hf-token"], "checkpointClaim": "shared.ckpt-1",
                                        "storageClass": "fast-ssd",
                                        "nodeSelector": {"nvidia.com/gpu.product": "H100-SXM", "zone": ""}}}, None),
    ("ok-output", "ok-o", {"output": {"dir": "/workspace/out/run-1", "metricsPort": 9100}}, None),
    ("ok-output-relative", "ok-r", {"output": {"dir": "runs/a/b"}}, None),
    ("ok-weight-sync", "ok-ws", {"rollout": {"weightSync": {"transport": "collective", "port": 31000}}}, None),
    ("ok-mode-quoted-off", "ok-off", {"drift": {"mode": "off"}}, None),
]

BAD = [
    ("name-too-long-colocated", N47 + "x", {}, "metadata.name"),
    ("name-too-long-disaggregated", N44 + "x", {"resources": DIS}, "metadata.name"),
    ("name-not-a-label", "run.v1", {}, "metadata.name"),
    ("output-dir-dotdot", "b-dd", {"output": {"dir": "../../etc"}}, "output.dir"),
    ("output-dir-operator-mount", "b-etc", {"output": {"dir": "/etc/gprl"}}, "output.dir"),
    ("output-dir-escapes-workspace", "b-esc", {"output": {"dir": "/workspace/../etc"}}, "output.dir"),
    ("output-dir-is-workspace", "b-ws", {"output": {"dir": "/workspace/"}}, "output.dir"),
    ("memory-half-byte", "b-mem", {"resources": {"memory": "0.5"}}, "memory"),
    ("checkpoint-size-zero", "b-cs", {"resources": {"checkpointSize": "0Gi"}}, "checkpointSize"),
    ("cpu-negative", "b-cpu", {"resources": {"cpu": "-1"}}, "cpu"),
    ("cpu-not-a-quantity", "b-cpu2", {"resources": {"cpu": "four"}}, "cpu"),
    ("secret-name", "b-sec", {"resources": {"envFromSecrets": ["My_Secret"]}}, "envFromSecrets"),
    ("claim-name", "b-claim", {"resources": {"checkpointClaim": "Claim!"}}, "checkpointClaim"),
    ("storage-class-name", "b-sc", {"resources": {"storageClass": "fast ssd"}}, "storageClass"),
    ("node-selector-key", "b-nsk", {"resources": {"nodeSelector": {"bad key": "x"}}}, "nodeSelector"),
    ("node-selector-value", "b-nsv", {"resources": {"nodeSelector": {"gpu": "h100 sxm"}}}, "nodeSelector"),
    ("metrics-port-rendezvous", "b-p1", {"output": {"metricsPort": 29500}}, "metricsPort"),
    ("metrics-port-rollout", "b-p2", {"output": {"metricsPort": 8000}}, "metricsPort"),
    ("metrics-port-privileged", "b-p3", {"output": {"metricsPort": 80}}, "metricsPort"),
    ("weight-sync-port-metrics", "b-p4", {"rollout": {"weightSync": {"port": 9400}}}, "weightSync.port"),
    ("weight-sync-port-privileged", "b-p5", {"rollout": {"weightSync": {"port": 443}}}, "weightSync.port"),
    ("metrics-port-is-weight-sync-default", "b-p6", {"output": {"metricsPort": 29600}}, "metricsPort"),
    ("metrics-port-is-weight-sync-port", "b-p7", {"output": {"metricsPort": 31000},
                                                 "rollout": {"weightSync": {"port": 31000}}}, "metricsPort"),
    ("drift-mode-bare-off", "b-off", {"drift": {"mode": False}}, "mode"),
    ("snake-case-key", "b-snake", {"algo": {"group_size": 4}}, "group_size"),
    ("snake-case-section-key", "b-snake2", {"output": {"metrics_port": 9100}}, "metrics_port"),
    ("steps-boolean", "b-bool", {"algo": {"steps": True}}, "steps"),
    ("group-size-fraction", "b-frac", {"algo": {"groupSize": 4.5}}, "groupSize"),
    ("gpus-string", "b-gpus", {"resources": {"gpus": "1"}}, "gpus"),
    ("image-with-space", "b-img", {"resources": {"image": "my image:1"}}, "image"),
    ("suspend-not-boolean", "b-susp", {"suspend": "yes"}, "suspend"),
    ("seed-negative", "b-seed", {"seed": -1}, "seed"),
    ("no-policy", "b-nopol", {"model": {"policy": None}}, "model.policy"),
    ("no-gpm", "b-nogpm", {"gpm": {"path": None}}, "gpm.path"),
    ("no-prompts", "b-noprompts", {"data": {"prompts": None}}, "data.prompts"),
]

CASES = VALID + BAD


def manifest(name: str, spec: dict, namespace: str | None = None) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "gprl.dev/v1alpha1", "kind": "GPRLRun", "metadata": meta, "spec": with_sources(spec)}
