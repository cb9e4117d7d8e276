"""Function Network endpoints (``backend_provider: fxn``): OpenAI format, ``model`` = ``fxn_id``."""

from __future__ import annotations

from proxy.adapters.base import Job, UpstreamResponse
from proxy.adapters.openai import HTTPUpstream
from proxy.headers import request_headers


class FxnAdapter(HTTPUpstream):
    """Forwards to a Function Network node or gateway; the resolver already set ``fxn_id``."""

    name = "fxn"

    async def send(self, job: Job) -> UpstreamResponse:
        response = await self.request(
            job.method, job.path, body=job.body, headers=request_headers(job.headers)
        )
        return self.relay(response)
