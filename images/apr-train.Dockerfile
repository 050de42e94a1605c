# The GPU image: SFT, evaluation with the local engine, the GRPO trainer.
# Build from the repository root:  docker build -f images/apr-train.Dockerfile -t REGISTRY/apr-train:0.1.0 .
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY apr ./apr
COPY images/constraints.txt ./constraints.txt
# The base image's CUDA PyTorch is kept (--system-site-packages): nothing pulls another torch.
RUN python -m venv --system-site-packages /opt/apr \
 && /opt/apr/bin/pip install --no-cache-dir --constraint constraints.txt \
      ".[hf,eval,serve]" "numpy==2.4.6" "safetensors==0.8.0" "kfp==2.17.0" \
      "kfp-kubernetes==2.17.0" "minio==7.2.20"

FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
LABEL org.opencontainers.image.title="apr-train" \
      org.opencontainers.image.description="APR on Kubernetes: GPU training and evaluation" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/apr /opt/apr
RUN useradd --uid 10001 --create-home apr
USER 10001
ENV PATH=/opt/apr/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /home/apr
ENTRYPOINT ["apr"]
