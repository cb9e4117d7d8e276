"""Header hygiene both ways, with inbound auth on: nothing of the client's credentials or the
upstream's internals crosses the proxy, hop-by-hop headers stop at it, Host is the upstream's."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.auth.signing import Signer
from tests.conftest import StartProxy, upstream_url
from tests.fakes.fxn_node import FAKE_NODE, create_fake_node, gateway_headers

GATEWAY_KEY = bytes(31) + b"\x0b"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
INBOUND_KEY = "inbound-key-abcdef123456"


def internals_upstream(seen: list[dict[str, str]]) -> web.Application:
    """An upstream that leaks everything a careless server could send back."""

    async def chat(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await request.read()
        return web.Response(
            body=b'{"id":"x","object":"chat.completion","choices":[]}',
            content_type="application/json",
            headers={
                "Set-Cookie": "session=upstream-secret",
                "Server": "internal-llm/9.9",
                "X-Powered-By": "secret-stack",
                "Via": "1.1 internal-gateway",
                "Connection": "X-Internal-Route",
                "X-Internal-Route": "rack-7",
                "Alt-Svc": 'h3=":443"',
                "X-Kept": "yes",
            },
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_inbound_credentials_and_hop_by_hop_headers_stop_at_the_proxy(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    seen: list[dict[str, str]] = []
    upstream: TestServer = await aiohttp_server(internals_upstream(seen))
    gateway = Signer(GATEWAY_KEY).address
    client = await start_proxy({
        "backend_provider": "custom",
        "url": upstream_url(upstream),
        "bearer_token": "upstream-token",
        "auth": {"api_keys": [INBOUND_KEY], "fxn_signatures": {"allowed_addresses": [gateway]}},
    })
    headers = {
        **gateway_headers(GATEWAY_KEY, BODY, nonce="hygiene-1"),
        "x-api-key": INBOUND_KEY,
        "Content-Type": "application/json",
        "Cookie": "client=1",
        "Connection": "keep-alive, X-Request-Id",
        "X-Request-Id": "declared-hop-by-hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Forwarded": "for=10.0.0.1",
        "X-Forwarded-For": "10.0.0.1",
        "Host": "proxy.example",
    }
    resp = await client.post("/v1/chat/completions", data=BODY, headers=headers)
    assert resp.status == 200, await resp.text()

    sent = {k.lower(): v for k, v in seen[-1].items()}
    assert sent["authorization"] == "Bearer upstream-token"
    assert sent["host"] == f"{upstream.host}:{upstream.port}"
    for name in ("x-api-key", "x-address", "x-signature", "x-timestamp", "x-nonce", "cookie",
                 "keep-alive", "te", "upgrade", "forwarded", "x-forwarded-for"):
        assert name not in sent, name
    # the request id is the proxy's own for the next hop: the one it answered with
    assert sent["x-request-id"] == resp.headers["X-Request-ID"]
    assert INBOUND_KEY not in str(seen[-1])

    back = {k.lower(): v for k, v in resp.headers.items()}
    for name in ("set-cookie", "x-powered-by", "via", "x-internal-route", "alt-svc"):
        assert name not in back, name
    assert back.get("server") != "internal-llm/9.9"
    assert back["x-kept"] == "yes"


async def test_fxn_upstream_gets_the_proxy_signature_only(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    own_key = "0x" + "6d" * 32
    node_app = create_fake_node(allowed=[Signer(own_key).address])
    node: TestServer = await aiohttp_server(node_app)
    gateway = Signer(GATEWAY_KEY).address
    client = await start_proxy({
        "backend_provider": "fxn", "url": upstream_url(node), "fxn_id": "m",
        "fxn": {"private_key": own_key},
        "auth": {"fxn_signatures": {"allowed_addresses": [gateway]}},
    })
    inbound = gateway_headers(GATEWAY_KEY, BODY, nonce="inbound-1")
    resp = await client.post("/v1/chat/completions", data=BODY, headers=inbound)
    assert resp.status == 200, await resp.text()
    seen = node_app[FAKE_NODE].received[-1]
    assert seen.signer == Signer(own_key).address
    for name in ("X-Address", "X-Signature", "X-Nonce"):
        assert seen.headers[name] != inbound[name]
