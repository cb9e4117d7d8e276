"""Load generator: ``python -m bench.load URL COUNT CONCURRENCY MODE AUTH`` → prints errors.

MODE: ``0`` non-streamed, ``1`` streamed, ``slow`` streamed as 20 chunks 5 ms apart (an upstream
that reads the request's ``stop`` shape, ``bench.servers fast``), so each chunk arrives alone.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import uvloop

BODY = (b'{"model":"bench","messages":[{"role":"user","content":"Tell me something short."}],'
        b'"max_tokens":64,"temperature":0.2%s}')


#: What each MODE adds to the request body.
MODES = {"0": b"", "1": b',"stream":true',
         "slow": b',"stream":true,"stop":["bench:chunks=20:delay=5"]'}


async def run(url: str, count: int, concurrency: int, mode: str, auth: str) -> int:
    body = BODY % MODES[mode]
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    left = count
    errors = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                errors += resp.status != 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return errors


def main() -> None:
    url, count, concurrency, mode, auth = sys.argv[1:6]
    errors = uvloop.run(run(url, int(count), int(concurrency), mode, auth))
    print(errors)


if __name__ == "__main__":
    main()
