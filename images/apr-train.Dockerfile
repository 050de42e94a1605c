# The GPU image: SFT, the GRPO trainer, and evaluation with SGLang 0.5.23 beside it (the
# `gpu` extra: PyTorch 2.14.1 on CUDA 13 from its wheels, SGLang and its kernels).
# Build from the repository root:  docker build -f images/apr-train.Dockerfile -t REGISTRY/apr-train:0.1.0 .
# The CUDA toolkit of the devel image is there for SGLang's kernels that compile at first use.
FROM nvidia/cuda:13.0.2-devel-ubuntu24.04 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Every package from the image's lock (scripts/lock_images.py), each checked against its hashes.
COPY images/apr-train.lock ./apr-train.lock
RUN python3.12 -m venv /opt/apr \
 && /opt/apr/bin/pip install --no-cache-dir --upgrade pip==24.3.1 \
 && /opt/apr/bin/pip install --no-cache-dir --require-hashes --no-deps -r apr-train.lock
COPY pyproject.toml README.md ./
COPY apr ./apr
RUN /opt/apr/bin/pip install --no-cache-dir --no-deps . && /opt/apr/bin/pip check

FROM nvidia/cuda:13.0.2-devel-ubuntu24.04
LABEL org.opencontainers.image.title="apr-train" \
      org.opencontainers.image.description="APR on Kubernetes: GPU training and evaluation" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/apr /opt/apr
RUN useradd --uid 10001 --create-home apr
USER 10001
ENV PATH=/opt/apr/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /home/apr
ENTRYPOINT ["apr"]
