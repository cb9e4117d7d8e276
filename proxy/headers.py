"""Header hygiene: what crosses the proxy in each direction.

Towards the upstream only an allow-list of client headers travels, so inbound credentials
(``Authorization``, ``x-api-key``, ``X-Signature`` and the rest of Function Network's
signature headers), cookies and hop-by-hop headers never leave the node. Back to the client,
hop-by-hop headers, cookies and the upstream's server internals are dropped;
``Content-Encoding`` stays with the bytes it describes (the proxy asks for identity, but an
upstream that compresses anyway is relayed decodable).
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

#: The ``Server`` header of every answer: no product versions for a scanner to match.
SERVER = "model-backend-proxy"

FORWARDED_REQUEST_HEADERS = frozenset(
    {"content-type", "accept", "x-request-id", "traceparent", "tracestate"}
)

DROPPED_RESPONSE_HEADERS = frozenset(
    {
        # hop-by-hop (RFC 9110 section 7.6.1) and framing the proxy redoes itself
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        # state and internals that belong to the upstream, not to the network's client
        "set-cookie",
        "server",
        "date",
        "via",
        "x-powered-by",
        "alt-svc",
    }
)


def request_headers(incoming: Mapping[str, str]) -> dict[str, str]:
    """The client headers that may be sent upstream."""
    if not isinstance(incoming, MultiMapping):
        incoming = CIMultiDict(incoming)
    # A handful of case-insensitive lookups, rather than lowering every header the client sent.
    out = {}
    for name in FORWARDED_REQUEST_HEADERS:
        value = incoming.get(name)
        if value is not None:
            out[name] = value
    if out and "Connection" in incoming:
        hop = _connection_tokens(incoming)
        out = {k: v for k, v in out.items() if k not in hop}
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream headers relayed to the client."""
    hop = _connection_tokens(upstream) if "Connection" in upstream else frozenset()
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in upstream.items():
        lower = key.lower()
        if lower not in DROPPED_RESPONSE_HEADERS and lower not in hop:
            out.add(key, value)
    return out


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Headers the sender declared hop-by-hop in ``Connection`` (RFC 9110 section 7.6.1)."""
    if isinstance(headers, MultiMapping):
        values = headers.getall("Connection", [])
    else:
        values = [v for k, v in headers.items() if k.lower() == "connection"]
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
