FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && useradd --system --uid 10001 proxy

USER proxy
ENV MODEL_BACKEND_CONFIG=/etc/model-proxy/model_backend.yaml
EXPOSE 8080
# Binding 0.0.0.0 requires inbound auth in the config (or auth.allow_unauthenticated: true).
CMD ["model-proxy", "serve", "--host", "0.0.0.0"]
