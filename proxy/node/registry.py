"""Who may sign requests to this node, kept fresh from the chain.

Two allow-lists, as the reference node has them: ``challenge`` holds the scheduler alone
(``POST /challenge``); ``inference`` holds the gateways the chain's GatewayRegistry lists as
active and the scheduler (``/v1/*``, where ``auth.fxn_signatures.allowed_addresses`` of the
current config are trusted too, so a reload can change those).
Both are :class:`~proxy.auth.signing.AllowList` objects: verifiers read them on every request,
and a refresh swaps the content in one assignment, so the request path does no more than
the set lookup it always did.

:meth:`Registry.run` refreshes every ``node.chain.refresh`` seconds. A failed read (RPC down,
an error answer, data that does not decode) keeps the last good list, counts
``model_proxy_node_registry_failures{reason}`` and logs one line; nothing here can fail a
request. Until the first good read only the scheduler (and the static addresses) may sign.
An entry whose id names no signer address is skipped and counted
(``model_proxy_node_registry_entries_skipped``); the rest of the read applies.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.auth.signing import AllowList
from proxy.config import NodeSection
from proxy.metrics import NodeMetrics
from proxy.node.chain import Chain, ChainError, Gateway, gateway_address

log = logging.getLogger("model_proxy")


class Registry:
    """The node's signer allow-lists, refreshed from a :class:`Chain` when there is one."""

    def __init__(
        self,
        section: NodeSection,
        metrics: NodeMetrics,
    ) -> None:
        self.section = section
        self._metrics = metrics
        self.challenge = AllowList([section.scheduler_address])
        self.inference = AllowList([section.scheduler_address])
        #: Lower-case addresses of the gateways of the last good read.
        self.gateways: frozenset[str] = frozenset()
        self.last_good: float | None = None
        self._failing = False
        #: Entries skipped at the last good read (logged when it changes).
        self._skipped = 0
        metrics.watch_registry(
            gateways=lambda: len(self.gateways),
            age=lambda: -1.0 if self.last_good is None else time.monotonic() - self.last_good,
        )

    async def refresh(self, chain: Chain) -> bool:
        """Read the registry once; on success adopt its gateways. Never raises ChainError."""
        section = self.section.chain
        if section is None:
            return False
        try:
            registry = await chain.gateway_registry(section.router_address)
            entries = await chain.active_gateways(registry)
        except ChainError as exc:
            self._metrics.count_registry_failure(exc.reason)
            kept = "no list yet" if self.last_good is None else f"{len(self.gateways)} kept"
            log.warning("node: gateway registry read failed (%s): %s; %s", exc.reason, exc, kept)
            self._failing = True
            return False
        addresses = self._signers(entries)
        self.gateways = frozenset(a.lower() for a in addresses)
        self.inference.replace([self.section.scheduler_address, *addresses])
        self.last_good = time.monotonic()
        if self._failing or log.isEnabledFor(logging.DEBUG):
            log.info("node: gateway registry read again: %d active gateways", len(addresses))
        self._failing = False
        return True

    def _signers(self, entries: list[Gateway]) -> set[str]:
        """The signer addresses of ``entries``; an entry whose id names no address is skipped
        and counted, never a reason to keep the last list (which may hold a removed gateway)."""
        addresses: set[str] = set()
        skipped = 0
        for entry in entries:
            if entry.paused:  # vouches for no one, on purpose
                continue
            address = gateway_address(entry)
            if address is None:
                skipped += 1
            else:
                addresses.add(address)
        if skipped:
            self._metrics.count_registry_skipped(skipped)
        if skipped != self._skipped:  # one line when the number changes, not every refresh
            log.warning("node: %d gateway registry entries skipped: their id is not a signer "
                        "address; the other %d entries apply", skipped, len(addresses))
            self._skipped = skipped
        return addresses

    async def run(self, chain: Chain | None) -> None:
        """Refresh now, then every ``node.chain.refresh`` seconds, until cancelled."""
        if chain is None or self.section.chain is None:
            return
        period = self.section.chain.refresh
        while True:
            try:
                await self.refresh(chain)
            except Exception:  # a bug must not stop the refreshes, nor take inference down
                self._metrics.count_registry_failure("internal")
                log.exception("node: gateway registry refresh failed")
            await asyncio.sleep(period)
