"""model-backend-proxy: a small, fast reverse proxy in front of a node's model backend."""

__version__ = "0.1.0"
