"""Kubernetes manifests for the GRPO job: the trainer with SGLang as a native sidecar.

Released KFP cannot declare a sidecar, so the pipeline's GRPO step launches this Job with
the `kubernetes` client. The pod holds the trainer container and SGLang as an init container
with `restartPolicy: Always` (native sidecars, Kubernetes 1.29+): SGLang starts first, stays
up for the whole run, and stops when the trainer exits. Both run the training image (it holds
SGLang) unless `sglang_image` names another. Both share an emptyDir for weights
(the trainer writes safetensors there, then calls `/update_weights_from_disk`) and talk over
localhost.

`run_grpo_job` stages the inputs in the store and sees such a Job through from the pipeline
step (`apr.cluster.jobs`), under a ServiceAccount that `apr.cluster.rbac` grants Jobs to.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from apr.cluster.defaults import (
    S3_ENDPOINT,
    S3_SECRET,
    SGLANG_IMAGE,
    TRAIN_IMAGE,
    s3_secret_env,
)
from apr.cluster.jobs import launch_job, print_now
from apr.storage import S3Settings, download, remove, upload
from apr.train.checkpoints import MIRROR_SLOTS

SGLANG_PORT = 30000
SHARED = "/shared"  # the weights directory both containers see


@dataclass(frozen=True)
class GRPOJobSpec:
    name: str
    model_uri: str  # the SFT model to start from (s3://... as published, or a path)
    namespace: str = "kubeflow"
    trainer_image: str = TRAIN_IMAGE
    sglang_image: str = SGLANG_IMAGE  # "": the trainer's image
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
        "image": spec.sglang_image or spec.trainer_image,
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
        # The training image runs as its user 10001; another SGLang image may run as root,
        # so no runAsNonRoot here. Neither needs any privilege beyond that.
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    secret = s3_secret_env(spec.s3_secret)
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


def run_grpo_job(spec_fields: dict, model_dir: str, data_dir: str, store: str,
                 trainer_args: list[str], out_model: str, settings: S3Settings | None = None,
                 timeout_s: float = 0, log: Callable[[str], Any] = print_now) -> dict:
    """Stage the SFT model and the problems in the store, run the GRPO Job (trainer + SGLang
    sidecar) to its end, and bring the trained model back into `out_model`.

    Returns the run's summary (`grpo.json`). `store` is an s3:// URI that this step (with
    `settings`) and the Job (with `spec_fields["s3_endpoint"]` and its Secret) both reach.
    """
    name = spec_fields["name"]
    base = f"{store.rstrip('/')}/grpo-runs/{name}"
    upload(model_dir, f"{base}/initial", settings)
    with tempfile.TemporaryDirectory() as staging:
        shutil.copytree(Path(data_dir) / "problems", Path(staging) / "problems")
        upload(staging, f"{base}/problems", settings)
    args = ("--model", f"{SHARED}/initial", "--problems", f"{base}/problems",
            "--out", f"{base}/run", "--resume", "--no-progress", *trainer_args)
    spec = GRPOJobSpec(**{**spec_fields, "model_uri": f"{base}/initial", "trainer_args": args})
    launch_job(grpo_job(spec), timeout_s=timeout_s, log=log)
    download(f"{base}/run/model", out_model, settings)
    with tempfile.TemporaryDirectory() as logs:
        download(f"{base}/run/logs", Path(logs) / "logs", settings)
        summary = json.loads((Path(logs) / "logs" / "grpo.json").read_text())
    # The run is done and its model is the step's output: what only a resume needed goes
    # (the staged copies of the SFT model and the problems, the checkpoints with their
    # optimizer state); the trained model and the logs stay under `base`/run.
    for staged in ("initial", "problems", *(f"run/{slot}" for slot in MIRROR_SLOTS)):
        remove(f"{base}/{staged}", settings)
    return summary
