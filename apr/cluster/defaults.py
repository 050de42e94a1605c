"""What the cluster pieces assume of a standard install: image names and the artifact store.

One home for these, so the pipeline, its components and the GRPO Job cannot disagree.
"""

APR_IMAGE = "ghcr.io/apr-on-kubernetes/apr:0.1.0"  # CPU steps: datagen, compare, publish
TRAIN_IMAGE = "ghcr.io/apr-on-kubernetes/apr-train:0.1.0"  # CUDA steps: SFT, evaluation, trainer
# The GRPO Job's rollout sidecar: "" is the trainer's image, which holds SGLang 0.5.23 on
# the trainer's own torch (one image to pull on the GPU node; weights saved by the trainer
# load in the same library versions). Another image needs SGLang importable by the `python3`
# on its PATH: the sidecar's command and its exec probe both run it.
SGLANG_IMAGE = ""
S3_SECRET = "mlpipeline-minio-artifact"  # the standard KFP install's artifact store Secret
# That Secret's keys, and the variables the S3 client reads them from.
S3_SECRET_KEYS = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}


def s3_secret_env(secret: str = S3_SECRET) -> list[dict]:
    """A container's env entries that take the store's credentials from `secret`."""
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for key, env in S3_SECRET_KEYS.items()]
S3_ENDPOINT = "http://seaweedfs.kubeflow:9000"  # KFP 2.15+ serves its artifact store here
