"""Node mode (``proxy.node``) on the application: ``POST /challenge``, ``GET /health`` and the
registry task.

:func:`install` is called by ``create_app`` when the config has ``node:``; it adds the two
routes (through the same edge layer as every route) and one ``cleanup_ctx`` that runs the
registry refreshes with a client session of its own, so the network's lookups never share
the upstream's connection pool. The inbound verifier for ``/v1/*`` is pointed at the
registry's live allow-list (``AuthState.allowed``); nothing else on the request path changes.

``/challenge`` checks the scheduler's signature itself (the general auth layer lets the path
through): API keys and gateway signatures do not open it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from proxy.auth.nonces import NonceCache
from proxy.auth.signing import Signer, Verifier
from proxy.config import BaseConfig, NodeSection
from proxy.errors import BadRequest, ProxyError, Unauthorized
from proxy.metrics import NodeMetrics
from proxy.node.chain import Chain
from proxy.node.challenge import TYPES, Budget, Challenges
from proxy.node.identity import Identity
from proxy.node.registry import Registry
from proxy.server.edge import Handler, RuntimeHandler, read_body
from proxy.server.runtime import Runtime
from proxy.server.tasks import running
from proxy.upstream.exchange import Exchange

log = logging.getLogger("model_proxy")

#: Paths the general auth layer lets through: the node's liveness answer, and /challenge,
#: which checks the scheduler's signature on its own.
NODE_PATHS = frozenset({"/challenge", "/health"})


@dataclass(slots=True)
class Node:
    """Node mode's state, hung on the application under :data:`NODE`."""

    section: NodeSection
    registry: Registry
    challenges: Challenges
    verifier: Verifier
    metrics: NodeMetrics
    session: aiohttp.ClientSession | None = None


NODE = web.AppKey("node", Node)


def build(config: BaseConfig, metrics: NodeMetrics, *, signer: Signer | None = None) -> Node:
    """Node mode's objects for ``config`` (which has ``node:``); no I/O happens here."""
    section = config.node
    signatures = config.auth.fxn_signatures
    assert section is not None and signatures is not None  # the config guarantees both
    signer = signer or Signer.from_file(section.key_file)
    registry = Registry(section, metrics)
    verifier = Verifier(
        (),
        live=registry.challenge,
        window=signatures.window_seconds,
        max_nonces=signatures.nonce_cache_size,
        # a restart forgets the nonces seen: refuse what may have been signed before it
        nonces=NonceCache(signatures.window_seconds, signatures.nonce_cache_size,
                          not_before=time.time()),
    )
    identity = Identity(signer, section.public_ip)
    challenges = Challenges(identity, budget=Budget(
        section.max_matrix_size, section.max_matrix_elements, section.max_matrix_flops))
    return Node(section, registry, challenges, verifier, metrics)


def install(
    app: web.Application, node: Node, wrap: Callable[[RuntimeHandler, str], Handler]
) -> None:
    """Add node mode's routes (each wrapped by ``wrap(handler, metrics_label)``) and its
    ``cleanup_ctx`` to ``app``; call before the catch-all route is added."""
    app[NODE] = node
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/challenge", wrap(challenge, "challenge"))
    app.router.add_get("/health", wrap(health, ""))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    timeout = node.section.chain.timeout if node.section.chain else 10.0
    session = node.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=8), timeout=aiohttp.ClientTimeout(total=timeout)
    )
    chain = None
    if node.section.chain is not None:
        chain = Chain(session, node.section.chain.rpc_url, timeout=timeout)
    try:
        async with running(node.registry.run(chain), "node-registry"):
            yield
    finally:
        await session.close()


async def challenge(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.Response:
    node = request.app[NODE]
    try:
        node.verifier.precheck(request.headers)
        body = await read_body(request, runtime.config.limits.max_body_bytes)
        node.verifier.verify(request.headers, body)
    except Unauthorized as exc:
        node.metrics.count_challenge("none", "unauthorized")
        log.info("node: challenge refused: %s", exc.code)
        raise
    assert node.session is not None
    try:
        kind, result = await node.challenges.answer(body, node.session)
    except BadRequest as exc:
        node.metrics.count_challenge(_kind(body), "bad_request")
        log.info("node: challenge refused: %s", exc.message)
        raise
    except ProxyError as exc:
        node.metrics.count_challenge(_kind(body), "failed")
        log.warning("node: challenge failed: %s", exc.message)
        raise
    node.metrics.count_challenge(kind, "ok")
    return web.Response(body=orjson.dumps(result), content_type="application/json")


async def health(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.Response:
    # The node's own liveness answer, which the network's tools expect as it is.
    return web.Response(text="OK", content_type="text/plain")


def _kind(body: bytes) -> str:
    """The challenge type for a metric label: one of :data:`TYPES` or ``other``."""
    try:
        kind = orjson.loads(body).get("type")
    except (orjson.JSONDecodeError, AttributeError):
        return "other"
    return kind if kind in TYPES else "other"
