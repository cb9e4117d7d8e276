"""The chain's gateway list, entry by entry: a malformed entry is skipped and counted, the rest
applies (a removed gateway is never kept because a neighbour was malformed), and a list that
takes seconds to decode does not hold the event loop meanwhile."""

from __future__ import annotations

import asyncio

from proxy.server.node import NODE
from tests.fakes.fxn_network import Entry, FakeChain, aliased_gateways
from tests.node.conftest import GATEWAY, GATEWAY_KEY, SCHEDULER_KEY, StartNode, eventually
from tests.node.test_node_app import _accepted, gateway_entry, metric

SKIPPED = "model_proxy_node_registry_entries_skipped_total"
#: 42 bytes like an address as text, with whitespace that bytes.fromhex would let through.
SPACED_ID = b"0x " + b"ab" * 19 + b" "
OTHER_GATEWAY_KEY = "5" * 64


def malformed(id_: bytes) -> Entry:
    return Entry(owner="0x" + "33" * 20, id=id_)


async def test_a_malformed_entry_is_skipped_and_a_removed_gateway_is_refused(
    start_node: StartNode, chain: FakeChain
) -> None:
    chain.gateways.append(gateway_entry())
    client = await start_node()
    await eventually(lambda: _accepted(client, GATEWAY_KEY))
    assert await metric(client, SKIPPED) == 0

    # the gateway leaves the registry as an entry with a malformed id arrives
    chain.gateways[:] = [malformed(SPACED_ID), malformed(b"0x" + b"zz" * 20),
                         malformed(b"\xff" * 42)]
    await eventually(lambda: _refused(client, GATEWAY_KEY))
    assert await metric(client, "model_proxy_node_gateways") == 0
    assert await metric(client, SKIPPED) >= 3
    assert await metric(client, "model_proxy_node_registry_failures_total",
                        reason="internal") == 0
    assert await _accepted(client, SCHEDULER_KEY)

    # and the well-formed neighbours of a malformed entry apply
    chain.gateways[:] = [malformed(SPACED_ID), gateway_entry()]
    await eventually(lambda: _accepted(client, GATEWAY_KEY))
    assert await metric(client, "model_proxy_node_gateways") == 1


async def _refused(client: object, key: str) -> bool:
    return not await _accepted(client, key)  # type: ignore[arg-type]


async def test_a_list_that_takes_long_to_decode_leaves_the_loop_running(
    start_node: StartNode, chain: FakeChain
) -> None:
    client = await start_node()
    registry = client.app[NODE].registry
    await eventually(lambda: _positive_age(client))
    # 30,000 entries in under 1 MB of ABI: a second or more of pure-Python decoding
    chain.registry_answer = aliased_gateways(30_000, gateway_entry())
    asked = chain.registry_answers
    while chain.registry_answers == asked:  # from the moment the chain answers ...
        await asyncio.sleep(0)
    ticks = 0
    while not registry.gateways:  # ... until the list is adopted, the loop keeps turning
        await asyncio.sleep(0)
        ticks += 1
    assert registry.gateways == {GATEWAY.lower()}
    # Decoded on the loop, the loop turns only while the answer is read (about a dozen times
    # here); decoded in a thread, it turns all along the decoding (some 17,000 times here).
    assert ticks > 1_000, ticks


async def _positive_age(client: object) -> bool:
    return await metric(client, "model_proxy_node_registry_age_seconds") >= 0  # type: ignore[arg-type]
