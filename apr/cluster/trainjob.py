"""SFT beyond one node: a Kubeflow Trainer `TrainJob` on the torch runtime.

The Trainer (trainer.kubeflow.org/v1alpha1) turns a TrainJob into a JobSet of `numNodes`
pods, each with `numProcPerNode` GPUs and the PET_* variables torchrun reads (nodes,
processes per node, node rank, the rendezvous address on node 0). Each pod runs
`apr sft-node` (apr/train/node.py): it fetches the dataset artifact from the
store, runs `apr sft` under torchrun, mirrors checkpoints in the store (a restarted TrainJob
resumes), and node 0 publishes the model there. Scheduling, GPU drivers, NCCL between pods
and the runtime's pod template (tolerations, /dev/shm) are the Trainer's and the cluster's.
"""

from __future__ import annotations

from dataclasses import dataclass

from apr.cluster.defaults import S3_ENDPOINT, S3_SECRET, TRAIN_IMAGE

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
    gpus_per_node: int = 1
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
    secret = [{"name": env, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": key}}}
              for env, key in (("AWS_ACCESS_KEY_ID", "accesskey"),
                               ("AWS_SECRET_ACCESS_KEY", "secretkey"))]
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
