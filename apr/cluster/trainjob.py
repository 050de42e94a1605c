"""SFT beyond one node: a Kubeflow Trainer `TrainJob` on the torch runtime.

The Trainer (trainer.kubeflow.org/v1alpha1) turns a TrainJob into a JobSet of `numNodes`
pods, each with `numProcPerNode` GPUs and the PET_* variables torchrun reads (nodes,
processes per node, node rank, the rendezvous address on node 0). Each pod runs
`apr sft-node` (apr/train/node.py): it fetches the dataset artifact from the store, runs
`apr sft` under torchrun, mirrors checkpoints in the store (a restarted TrainJob resumes),
and node 0 publishes the model there. `run_sft_trainjob` is the pipeline step's side: stage
the data, launch and follow the TrainJob (`apr.cluster.jobs`), fetch the model. Scheduling,
GPU drivers, NCCL between pods and the runtime's pod template (tolerations, /dev/shm) are
the Trainer's and the cluster's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from apr.cluster.defaults import S3_ENDPOINT, S3_SECRET, TRAIN_IMAGE, s3_secret_env
from apr.cluster.jobs import launch_job, print_now
from apr.storage import S3Settings, download, remove, upload
from apr.train.checkpoints import MIRROR_SLOTS

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime the Trainer installs for PyTorch
NODE_COMMAND = ("apr", "sft-node")


@dataclass(frozen=True)
class TrainJobSpec:
    name: str
    data_uri: str  # the dataset artifact, staged in the store
    out_uri: str  # checkpoints/ and result/ (the model, sft.json) go here
    preset: str
    overrides: tuple[str, ...] = ()  # `apr sft --set`, traces included
    nodes: int = 2
    gpus_per_node: int = 1  # torchrun's processes on each node
    namespace: str = "kubeflow"
    image: str = TRAIN_IMAGE
    runtime: str = RUNTIME
    gpu_resource: str = "nvidia.com/gpu"
    s3_secret: str = S3_SECRET  # keys accesskey / secretkey
    s3_endpoint: str = S3_ENDPOINT


def node_args(spec: TrainJobSpec) -> list[str]:
    """The arguments of `apr sft-node` on every node."""
    args = ["--data", spec.data_uri, "--out", spec.out_uri, "--config", spec.preset]
    for override in spec.overrides:
        args += ["--set", override]
    return args


def trainjob(spec: TrainJobSpec) -> dict:
    """The TrainJob manifest, as a plain dict (validated against the Trainer's CRD schema by
    the tests)."""
    secret = s3_secret_env(spec.s3_secret)
    gpus = {spec.gpu_resource: spec.gpus_per_node}
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace,
                     "labels": {"app.kubernetes.io/name": "apr-sft",
                                "app.kubernetes.io/instance": spec.name,
                                "app.kubernetes.io/component": "sft",
                                "app.kubernetes.io/part-of": "apr"}},
        "spec": {
            "runtimeRef": {"name": spec.runtime, "kind": "ClusterTrainingRuntime",
                           "apiGroup": "trainer.kubeflow.org"},
            "trainer": {
                "image": spec.image,
                "command": list(NODE_COMMAND),
                "args": node_args(spec),
                "env": [{"name": "S3_ENDPOINT", "value": spec.s3_endpoint}, *secret],
                "numNodes": spec.nodes,
                "numProcPerNode": spec.gpus_per_node,
                "resourcesPerNode": {"limits": dict(gpus), "requests": dict(gpus)},
            },
        },
    }


def run_sft_trainjob(spec_fields: dict, data_dir: str, store: str, out_dir: str,
                     settings: S3Settings | None = None, timeout_s: float = 0,
                     log: Callable[[str], Any] = print_now) -> Path:
    """Stage the dataset in the store, run the TrainJob to its end, and bring its result (the
    model and sft.json) into `out_dir`; returns `out_dir`.

    `spec_fields`: TrainJobSpec's fields but the URIs. A retried step (same name) replaces
    the TrainJob, whose nodes resume from the checkpoints mirrored under the same prefix.
    """
    base = f"{store.rstrip('/')}/sft-jobs/{spec_fields['name']}"
    upload(data_dir, f"{base}/data", settings)
    spec = TrainJobSpec(**{**spec_fields, "data_uri": f"{base}/data", "out_uri": base})
    launch_job(trainjob(spec), timeout_s=timeout_s, log=log)
    download(f"{base}/result", out_dir, settings)
    # Done: the staged data and the checkpoints (with optimizer state) go; the result stays.
    for staged in ("data", *(f"checkpoints/{slot}" for slot in MIRROR_SLOTS)):
        remove(f"{base}/{staged}", settings)
    return Path(out_dir)
