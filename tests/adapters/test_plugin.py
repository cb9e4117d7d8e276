"""A third-party adapter named by ``module:Class``: it gets only the allow-listed client headers,
so trusting ``Job.headers`` can never forward a client's credentials upstream."""

from __future__ import annotations

from typing import Any

from proxy.adapters.base import Adapter, Job, UpstreamResponse
from tests.conftest import StartProxy


class HeaderEcho(Adapter):
    """Answers every job with the headers it was handed, as a careless plugin would forward."""

    name = "header-echo"

    async def send(self, job: Job) -> UpstreamResponse:
        return UpstreamResponse.from_json({"headers": dict(job.headers)})


CLIENT_HEADERS = {
    "Authorization": "Bearer client-secret",
    "x-api-key": "client-key",
    "X-Signature": "0xdeadbeef",
    "X-Timestamp": "1700000000",
    "X-Nonce": "n-1",
    "X-Address": "0x0000000000000000000000000000000000000001",
    "Cookie": "session=abc",
    "Proxy-Authorization": "Basic eA==",
    "X-Request-Id": "req-42",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "X-Custom": "kept-out",
}


async def test_plugin_gets_only_allow_listed_headers(start_proxy: StartProxy) -> None:
    client = await start_proxy({"backend_provider": f"{__name__}:HeaderEcho"})
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers=CLIENT_HEADERS,
    )
    assert resp.status == 200
    seen: dict[str, Any] = (await resp.json())["headers"]
    # aiohttp's client adds Accept and Content-Type itself; both are on the allow-list
    assert {k.lower() for k in seen} == {"accept", "content-type", "x-request-id", "traceparent"}
    assert seen["x-request-id"] == "req-42"
    text = str(seen)
    for secret in ("client-secret", "client-key", "0xdeadbeef", "session=abc", "eA=="):
        assert secret not in text
