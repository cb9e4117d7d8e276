# model-backend-proxy container image. One tag everywhere (README, deploy/): model-proxy:VERSION
# (pyproject.toml's version), and model-proxy:VERSION-vllm for the GPU image.
#
#   docker build -t model-proxy:0.1.0 .                                   # CPU image
#   docker build -t model-proxy:0.1.0-vllm --build-arg EXTRAS=vllm .      # GPU image
#
# Python 3.11 (the default), 3.12 or 3.13 for the CPU image
# (--build-arg PYTHON_IMAGE=python:3.12-slim-bookworm); the GPU image: 3.11 only (its lock,
# requirements/proxy-vllm.txt, is for Linux x86_64 and Python 3.11). The GPU image needs no
# CUDA base image (the CUDA libraries come with vLLM's and torch's wheels); the host needs the
# NVIDIA driver (580 or newer: CUDA 13) and the NVIDIA Container Toolkit (deploy/compose/vllm).
# Without a registry: .ci/container-image makes a base image from Debian's packages
# (mmdebstrap) and builds this file with podman (what CI does).
#   docker run -p 8080:8080 -v "$PWD/model_backend.yaml:/etc/model-proxy/model_backend.yaml:ro" model-proxy:0.1.0
#
# Config: /etc/model-proxy/model_backend.yaml (MODEL_BACKEND_CONFIG), mounted read-only.
# Secrets: ${ENV_VAR} in the YAML (docker run -e UPSTREAM_API_KEY=...) or *_file keys that
# point at mounted files (api_key_file: /run/secrets/upstream_api_key).
# The container binds 0.0.0.0:8080, so the config needs inbound auth (auth.api_keys, ...) or
# auth.allow_unauthenticated: true; beyond loopback, put TLS in front (deploy/tls).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- dependencies: their own layer, rebuilt only when the lock changes ----------------------
# The lock (exact versions, hashes; scripts/lock writes it): requirements/proxy.txt, or
# requirements/proxy-vllm.txt with EXTRAS=vllm. Nothing is resolved at build time.
FROM ${PYTHON_IMAGE} AS deps
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/model-proxy
ENV PATH=/opt/model-proxy/bin:$PATH
WORKDIR /src
COPY requirements/proxy.txt requirements/proxy-vllm.txt requirements/
RUN pip install --no-deps --require-hashes -r "requirements/proxy${EXTRAS:+-$EXTRAS}.txt" \
    && pip check

# --- the proxy itself, on top of the cached dependencies, built with the lock's setuptools --
FROM deps AS build
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-deps --no-build-isolation . && model-proxy --version

# --- runtime: the virtual environment only, as a numeric non-root user ----------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/model-proxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MODEL_BACKEND_CONFIG=/etc/model-proxy/model_backend.yaml \
    MODEL_PROXY_STATE_DIR=/var/lib/model-proxy
COPY --from=build /opt/model-proxy /opt/model-proxy
# the nonce journal of signed jobs (auth.fxn_signatures): mount a volume here so that a
# restarted container still refuses a replay. /var/cache/model-proxy: the GPU image's model
# cache (HF_HOME), a volume too; owned here so that a fresh named volume is writable.
RUN mkdir -p /var/lib/model-proxy /var/cache/model-proxy \
    && chown 10001:10001 /var/lib/model-proxy /var/cache/model-proxy
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["model-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
