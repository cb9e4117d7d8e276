"""What the IDENTITY challenge reports: the node's address, public IP, signature and GPUs.

The answer, as the reference node gives it::

    {"publicKey": "<checksummed address>", "ipAddress": "<ip>",
     "signature": "<base64 of 65 bytes r || s || v, v in {0, 1}>",
     "gpuStats": [{"name", "driver_version", "vram_total_mb", "vram_used_mb", "vram_free_mb",
                   "utilization_gpu_pct", "utilization_mem_pct"}, ...]}

The signature is over ``keccak256(public_key_65_bytes + b"." + ip)``, the hash signed as it is
(no EIP-191 prefix). GPU stats come from NVIDIA's management library when ``pynvml`` is
importable, else from ``nvidia-smi``; without either the list is empty.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
from typing import Any

import aiohttp

from proxy.auth.signing import Signer
from proxy.errors import ProxyError, reason
from proxy.node.chain import read_capped

log = logging.getLogger("model_proxy")

NVIDIA_SMI_QUERY = (
    "--query-gpu=name,driver_version,memory.total,memory.used,memory.free,"
    "utilization.gpu,utilization.memory"
)
#: Longest an IP lookup or a GPU query may take; IDENTITY answers within a few seconds.
LOOKUP_TIMEOUT = 5.0
_MAX_IP_ANSWER = 256


class Identity:
    """The node's key and where its public IP comes from (a fixed address or a URL)."""

    def __init__(
        self,
        signer: Signer,
        public_ip: str,
        *,
        nvidia_smi: str = "nvidia-smi",
    ) -> None:
        self.signer = signer
        self.public_ip = public_ip
        self.nvidia_smi = nvidia_smi

    async def answer(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        ip = await self.ip(session)
        digest = identity_digest(self.signer.public_key, ip)
        signature = self.signer.sign_digest(digest)
        return {
            "publicKey": self.signer.address,
            "ipAddress": ip,
            "signature": base64.b64encode(signature).decode("ascii"),
            "gpuStats": await gpu_stats(self.nvidia_smi),
        }

    async def ip(self, session: aiohttp.ClientSession) -> str:
        if not self.public_ip.startswith(("http://", "https://")):
            return self.public_ip
        try:
            async with session.get(
                self.public_ip, timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT)
            ) as response:
                text = await read_capped(response, _MAX_IP_ANSWER) or b""
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ProxyError(
                f"failed to get the public IP address: {reason(exc)}",
                code="public_ip_unavailable",
            ) from exc
        ip = text.decode("utf-8", "replace").strip()
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ProxyError(
                f"failed to get the public IP address: the lookup answered {status} "
                "without an IP address",
                code="public_ip_unavailable",
            ) from None
        return ip


def identity_digest(public_key: bytes, ip: str) -> bytes:
    from eth_utils.crypto import keccak

    return bytes(keccak(public_key + b"." + ip.encode("utf-8")))


async def gpu_stats(nvidia_smi: str = "nvidia-smi") -> list[dict[str, Any]]:
    """The GPUs as the reference node lists them; ``[]`` where none can be queried."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(_nvml_stats), LOOKUP_TIMEOUT)
    except ImportError:
        pass
    except Exception as exc:  # NVML present but failing (no driver): try nvidia-smi
        log.debug("node: NVML query failed (%s); trying nvidia-smi", reason(exc))
    try:
        process = await asyncio.create_subprocess_exec(
            nvidia_smi, NVIDIA_SMI_QUERY, "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return []  # no nvidia-smi: no NVIDIA GPU to report
    try:
        out, _ = await asyncio.wait_for(process.communicate(), LOOKUP_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        log.warning("node: nvidia-smi did not answer within %g s", LOOKUP_TIMEOUT)
        return []
    if process.returncode != 0:
        log.warning("node: nvidia-smi failed (exit %s)", process.returncode)
        return []
    return parse_nvidia_smi(out.decode("utf-8", "replace"))


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Rows of ``--format=csv,noheader,nounits`` output; a malformed row is skipped."""
    stats = []
    for line in text.strip().splitlines():
        values = [v.strip() for v in line.split(", ")]
        if len(values) < 7:
            continue
        stats.append(_stat(values[0], values[1], *(_number(v) for v in values[2:7])))
    return stats


def _stat(
    name: str, driver: str, total: float, used: float, free: float, gpu: float, mem: float
) -> dict[str, Any]:
    return {
        "name": name,
        "driver_version": driver,
        "vram_total_mb": int(total),
        "vram_used_mb": int(used),
        "vram_free_mb": int(free),
        "utilization_gpu_pct": float(gpu),
        "utilization_mem_pct": float(mem),
    }


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "[N/A]" and the like
        return 0.0


def _nvml_stats() -> list[dict[str, Any]]:
    import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, where installed

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        stats = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mib = 1024 * 1024
            stats.append(
                _stat(
                    _text(pynvml.nvmlDeviceGetName(handle)), _text(driver),
                    memory.total // mib, memory.used // mib, memory.free // mib,
                    rates.gpu, rates.memory,
                )
            )
        return stats
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
