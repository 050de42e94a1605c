"""What the cluster pieces assume of a standard install: image names and the artifact store.

One home for these, so the pipeline, its components and the GRPO Job cannot disagree.
"""

APR_IMAGE = "ghcr.io/apr-on-kubernetes/apr:0.1.0"  # CPU steps: datagen, compare, publish
TRAIN_IMAGE = "ghcr.io/apr-on-kubernetes/apr-train:0.1.0"  # CUDA steps: SFT, evaluation, trainer
SGLANG_IMAGE = "lmsysorg/sglang:v0.5.23"  # the GRPO Job's rollout sidecar
S3_SECRET = "mlpipeline-minio-artifact"  # the standard KFP install's artifact store Secret
S3_ENDPOINT = "http://seaweedfs.kubeflow:9000"  # KFP 2.15+ serves its artifact store here
