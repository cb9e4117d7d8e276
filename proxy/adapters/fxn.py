"""Function Network endpoints (``backend_provider: fxn``): the job sent on in OpenAI format.

As function-node sends it: ``model`` is ``model_name_alias`` when set, else ``fxn_id`` (the
network's id for the model); the credential is ``x-api-key`` when there is an ``api_key``,
else ``Authorization: Bearer`` (``FxnConfig.bearer_with_api_key`` is false).

With ``fxn.private_key`` (or ``fxn.private_key_file``) configured, every request this
adapter sends is signed as the network signs them (``proxy.auth.signing``): inference attempts,
model lists and readiness probes alike. Signing happens per request (``attempt_headers``), so
each retry of a job carries a fresh timestamp and nonce and is never taken for a replay.
The client's own signature headers never travel on: ``Job.headers`` is allow-listed.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from proxy.adapters.base import Job, UpstreamResponse
from proxy.adapters.http import HTTPUpstream
from proxy.auth.signing import Signer
from proxy.config import BaseConfig, FxnConfig
from proxy.errors import UpstreamError


class FxnAdapter(HTTPUpstream):
    """Forwards to a Function Network node or gateway; the resolver already set the model."""

    name = "fxn"
    asks_usage = True

    def __init__(self, config: BaseConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        key = config.fxn.private_key if isinstance(config, FxnConfig) else None
        # The config has already proved the key loads; this cannot raise for a valid config.
        self.signer = None if key is None else Signer.from_text(key.get_secret_value())

    def attempt_headers(self, body: bytes) -> Mapping[str, str] | None:
        # Signed over exactly the bytes sent; no body is signed as the empty string.
        return None if self.signer is None else self.signer.headers(body)

    async def check_ready(self) -> None:
        # Any answer below 500 shows the node is up, except a refusal of our credentials,
        # which would refuse every job too. Gateways need not list models, so 404 is fine.
        response = await self.request("GET", "/v1/models")  # a 401 or 403 raises here
        response.release()
        if response.status >= 500:
            raise UpstreamError(f"the upstream answered /v1/models with {response.status}")

    async def send(self, job: Job) -> UpstreamResponse:
        response = await self.request(
            job.method, job.path, body=job.body, headers=job.headers
        )
        return await self.relay(response, None if job.endpoint == "passthrough" else job)
