"""A one-off readiness probe of the configured upstream, for ``model-proxy check --probe``."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.adapters import load_adapter_class
from proxy.config import BaseConfig
from proxy.errors import ProxyError


async def probe(config: BaseConfig) -> str | None:
    """``None`` when the upstream is ready, else the reason it is not."""
    adapter_class = load_adapter_class(config)
    async with aiohttp.ClientSession() as session:
        adapter = adapter_class(config, session)
        try:
            await adapter.start()
            await adapter.until_started()  # an in-process engine: the probe is loading it
            async with asyncio.timeout(config.timeouts.connect + 5):
                await adapter.check_ready()
        except ProxyError as exc:
            return exc.message
        except TimeoutError:
            return "the readiness check timed out"
        finally:
            await adapter.close()
    return None
