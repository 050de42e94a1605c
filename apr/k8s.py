"""Kubernetes manifests for the GRPO job: the trainer with SGLang as a native sidecar.

Released KFP cannot declare a sidecar, so the pipeline's GRPO step launches this Job with
the `kubernetes` client. The pod holds the trainer container and SGLang as an init container
with `restartPolicy: Always` (native sidecars, Kubernetes 1.29+): SGLang starts first, stays
up for the whole run, and stops when the trainer exits. Both share an emptyDir for weights
(the trainer writes safetensors there, then calls `/update_weights_from_disk`) and talk over
localhost.

`apr.launch` runs such a Job from the pipeline step, under a ServiceAccount that
`rbac_manifests` grants Jobs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SGLANG_PORT = 30000
SHARED = "/shared"  # the weights directory both containers see
# Defaults shared with the pipeline (apr.pipeline, apr.components): one place to change them.
TRAIN_IMAGE = "ghcr.io/apr-on-kubernetes/apr-train:0.1.0"
SGLANG_IMAGE = "lmsysorg/sglang:v0.5.23"  # the GRPO Job's rollout sidecar
S3_SECRET = "mlpipeline-minio-artifact"  # the standard KFP install's artifact store Secret
S3_ENDPOINT = "http://seaweedfs.kubeflow:9000"  # KFP 2.15+ serves its artifact store here


@dataclass(frozen=True)
class GRPOJobSpec:
    name: str
    model_uri: str  # the SFT model to start from (s3://... as published, or a path)
    namespace: str = "kubeflow"
    trainer_image: str = TRAIN_IMAGE
    sglang_image: str = SGLANG_IMAGE
    trainer_args: tuple[str, ...] = ()  # appended to `apr grpo`
    gpus_trainer: int = 1
    gpus_sglang: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    shm_size: str = "8Gi"
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    s3_secret: str = S3_SECRET  # keys accesskey / secretkey
    s3_endpoint: str = S3_ENDPOINT
    ttl_seconds: int = 3600


def _gpu(count: int, resource: str) -> dict:
    return {"limits": {resource: count}, "requests": {resource: count}}


def grpo_job(spec: GRPOJobSpec) -> dict:
    """The Job manifest, as a plain dict (validated against Kubernetes schemas by the tests)."""
    labels = {"app.kubernetes.io/name": "apr-grpo", "app.kubernetes.io/instance": spec.name,
              "app.kubernetes.io/component": "grpo", "app.kubernetes.io/part-of": "apr"}
    # SGLang listens on the pod's loopback only (its weight-update API is not for the network),
    # and kubelet's httpGet probes dial the pod IP: probe from inside the container instead.
    health = {"exec": {"command": [
        "python3", "-c", "import urllib.request; urllib.request.urlopen("
        f"'http://127.0.0.1:{SGLANG_PORT}/health_generate', timeout=25)"]},
        "timeoutSeconds": 30}
    sidecar = {
        "name": "sglang",
        "image": spec.sglang_image,
        "restartPolicy": "Always",  # a native sidecar: up before the trainer, for its whole run
        "command": ["python3", "-m", "sglang.launch_server",
                    "--model-path", f"{SHARED}/initial", "--host", "127.0.0.1",
                    "--port", str(SGLANG_PORT), "--enable-metrics", "--allow-auto-truncate",
                    "--weight-version", "0"],
        "resources": _gpu(spec.gpus_sglang, spec.gpu_resource),
        # The trainer starts once SGLang has generated a token; loading can take minutes.
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 120},
        "readinessProbe": {**health, "periodSeconds": 10},
        "volumeMounts": [{"name": "shared", "mountPath": SHARED},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
        # The SGLang image runs as root; it needs no privilege beyond that.
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    secret = [{"name": env, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": key}}}
              for env, key in (("AWS_ACCESS_KEY_ID", "accesskey"),
                               ("AWS_SECRET_ACCESS_KEY", "secretkey"))]
    trainer = {
        "name": "trainer",
        "image": spec.trainer_image,
        "command": ["apr", "grpo", "--engine-url", f"http://127.0.0.1:{SGLANG_PORT}",
                    "--weights-dir", SHARED, *spec.trainer_args],
        "env": [{"name": "S3_ENDPOINT", "value": spec.s3_endpoint}, *secret],
        "resources": _gpu(spec.gpus_trainer, spec.gpu_resource),
        "volumeMounts": [{"name": "shared", "mountPath": SHARED}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "runAsUser": 10001, "capabilities": {"drop": ["ALL"]}},
    }
    # Init containers run in order: the SFT model is pulled before SGLang starts on it.
    pull = {
        "name": "pull-model",
        "image": spec.trainer_image,
        "command": ["apr", "pull", "--uri", spec.model_uri, "--out", f"{SHARED}/initial"],
        "env": [{"name": "S3_ENDPOINT", "value": spec.s3_endpoint}, *secret],
        "volumeMounts": [{"name": "shared", "mountPath": SHARED}],
        "securityContext": trainer["securityContext"],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,  # a failed run is resumed from its checkpoint by a new Job
            "ttlSecondsAfterFinished": spec.ttl_seconds,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,  # neither container calls the API
                    "initContainers": [pull, sidecar],
                    "containers": [trainer],
                    "volumes": [{"name": "shared", "emptyDir": {}},
                                {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                              "sizeLimit": spec.shm_size}}],
                    "nodeSelector": dict(spec.node_selector),
                    "tolerations": [{"key": spec.gpu_resource, "operator": "Exists",
                                     "effect": "NoSchedule"}],
                },
            },
        },
    }


def rbac_manifests(namespace: str, service_account: str = "pipeline-runner") -> list[dict]:
    """A Role and RoleBinding letting the pipeline's ServiceAccount (in `namespace`) launch Jobs."""
    name = "apr-job-launcher"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "apr"}
    metadata = {"name": name, "namespace": namespace, "labels": labels}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata,
        "rules": [
            {"apiGroups": ["batch"], "resources": ["jobs"],
             "verbs": ["create", "get", "list", "watch", "delete"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},  # why no pod came
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": dict(metadata),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }
    return [role, binding]
