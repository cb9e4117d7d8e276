"""Client deadlines on raw sockets: idle and trickling connections are closed in time, the
connection cap sheds idle keep-alive connections first, and the open-file limit is raised."""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.conftest import free_port, wait_healthy
from tests.hardening.wire import write_config

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@asynccontextmanager
async def proxy(tmp_path: Path, server: str, soft_files: int | None = None,
                hard_files: int | None = None,
                ) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    port = free_port()
    config = write_config(tmp_path / "c.yaml",
                          f"backend_provider: mock\nserver: {{port: {port}, {server}}}\n")

    def lower_limit() -> None:
        if soft_files is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft_files, hard_files or hard))

    with (tmp_path / "stderr").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=err, preexec_fn=lower_limit,
        )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield proc, port
    finally:
        proc.kill()
        await proc.wait()


async def closed_within(conn: Conn, seconds: float) -> bool:
    """Whether the proxy closes ``conn`` within ``seconds`` (anything it sends is read)."""
    reader, _ = conn
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def trickle(conn: Conn, data: bytes, gap: float, until: float) -> None:
    _, writer = conn
    try:
        for byte in data:
            if time.monotonic() > until:
                return
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(gap)
    except ConnectionError:
        return


async def test_idle_and_trickling_clients_are_closed_within_their_deadlines(
    tmp_path: Path,
) -> None:
    async with proxy(tmp_path, "keepalive_timeout: 1, body_timeout: 1") as (_, port):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        reused = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        for reader, writer in reused:  # one request each, then kept alive
            writer.write(HEALTH)
            await reader.readuntil(b'{"status": "ok"}')
        headers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        bodies = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        for _, writer in bodies:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        stop = time.monotonic() + 8
        trickling = [asyncio.create_task(trickle(c, b"X-Slow: " + b"a" * 200, 0.1, stop))
                     for c in headers]
        trickling += [asyncio.create_task(trickle(c, b" " * 999, 0.1, stop)) for c in bodies]
        started = time.monotonic()
        everyone = idle + reused + headers + bodies
        results = await asyncio.gather(*(closed_within(c, 4) for c in everyone))
        took = time.monotonic() - started
        for task in trickling:
            task.cancel()
        assert all(results), f"{results.count(False)} of {len(results)} connections still open"
        assert took < 4
        for _, writer in idle + reused + headers + bodies:
            writer.close()
        # and the proxy serves on
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTH)
        assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()


async def test_connection_cap_sheds_idle_keepalive_first(tmp_path: Path) -> None:
    async with proxy(tmp_path, "keepalive_timeout: 60, max_connections: 30") as (_, port):
        idle = []
        for _ in range(30):
            idle.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        newcomers = []
        for _ in range(10):  # each new one pushes out the oldest idle one, and is served
            conn = await asyncio.open_connection("127.0.0.1", port)
            conn[1].write(HEALTH)
            head = await asyncio.wait_for(conn[0].readuntil(b"\r\n\r\n"), 5)
            assert b"200 OK" in head
            newcomers.append(conn)
        shed = await asyncio.gather(*(closed_within(c, 1) for c in idle[:10]))
        kept = await asyncio.gather(*(closed_within(c, 0.3) for c in idle[10:]))
        assert all(shed), shed
        assert not any(kept), kept
        for _, writer in idle + newcomers:
            writer.close()


async def test_soft_open_file_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with proxy(tmp_path, "keepalive_timeout: 5", soft_files=256) as (proc, _):
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    soft_now = line.split()[3]
    assert soft_now == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard)), line


async def test_idle_connections_cannot_exhaust_a_low_open_file_limit(tmp_path: Path) -> None:
    # 256 descriptors in all: the cap comes down to what they allow, so a crowd of idle
    # connections is shed for newcomers instead of making accept() fail.
    async with proxy(tmp_path, "keepalive_timeout: 60", soft_files=256, hard_files=256) as (
        _, port,
    ):
        crowd = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        await asyncio.sleep(0.2)
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEALTH)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"200 OK" in head
            writer.close()
        for _, writer in crowd:
            writer.close()
