# The CPU image: datagen, the comparison report, publishing, the GRPO job launcher.
# Build from the repository root:  docker build -f images/apr.Dockerfile -t REGISTRY/apr:0.1.0 .
FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
# Every package from the image's lock (scripts/lock_images.py), each checked against its hashes.
COPY images/apr.lock ./apr.lock
RUN python -m venv /opt/apr \
 && /opt/apr/bin/pip install --no-cache-dir --upgrade pip==24.3.1 \
 && /opt/apr/bin/pip install --no-cache-dir --require-hashes --no-deps -r apr.lock
COPY pyproject.toml README.md ./
COPY apr ./apr
RUN /opt/apr/bin/pip install --no-cache-dir --no-deps . && /opt/apr/bin/pip check

FROM python:3.11.10-slim-bookworm
LABEL org.opencontainers.image.title="apr" \
      org.opencontainers.image.description="APR on Kubernetes: CPU stages and launchers" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/apr /opt/apr
RUN useradd --uid 10001 --create-home apr
USER 10001
ENV PATH=/opt/apr/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /home/apr
ENTRYPOINT ["apr"]
