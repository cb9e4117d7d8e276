"""Header hygiene: what crosses the proxy in each direction.

Towards the upstream only an allow-list of client headers travels, so inbound credentials
(``Authorization``, ``x-api-key``, ``X-Signature`` and the rest of Function Network's
signature headers), cookies and hop-by-hop headers never leave the node. Back to the client,
hop-by-hop headers, cookies and the upstream's server internals are dropped;
``Content-Encoding`` stays with the bytes it describes (the proxy asks for identity, but an
upstream that compresses anyway is relayed decodable).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
    # aiohttp's own type first: isinstance against the abstract class is a Python call
    if not isinstance(incoming, CIMultiDictProxy) and not isinstance(incoming, MultiMapping):
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


_DROPPED = frozenset(name.encode() for name in DROPPED_RESPONSE_HEADERS)


def relayed_headers(upstream: Iterable[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """The upstream headers (as the HTTP client parsed them) relayed to the client."""
    out: CIMultiDict[str] = CIMultiDict()
    hop: list[bytes] = []
    for name, value in upstream:
        lower = name.lower()
        if lower in _DROPPED:
            if lower == b"connection":
                hop.extend(t.strip().lower() for t in value.split(b",") if t.strip())
            continue
        out.add(name.decode("latin-1"), value.decode("latin-1"))
    for token in hop:
        out.popall(token.decode("latin-1"), None)
    return out


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Headers the sender declared hop-by-hop in ``Connection`` (RFC 9110 section 7.6.1)."""
    if isinstance(headers, MultiMapping):
        values = headers.getall("Connection", [])
    else:
        values = [v for k, v in headers.items() if k.lower() == "connection"]
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
