"""Node mode end to end: the scheduler's challenges, gateways from the chain, RPC failures."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path

from aiohttp.test_utils import TestClient
from eth_keys.datatypes import Signature

from proxy.auth.signing import Signer
from tests.conftest import free_port
from tests.fakes.fxn_network import (
    Entry,
    FakeChain,
    address_of,
    keccak256,
    send_request_headers,
)
from tests.node.conftest import (
    CHAT,
    GATEWAY,
    GATEWAY_KEY,
    SCHEDULER_KEY,
    StartNode,
    eventually,
    signed,
)

IDENTITY = {"type": "IDENTITY", "payload": {}}


async def metric(client: TestClient, name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "")
    match = re.search("^" + pattern + r" (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def gateway_entry(address: str = GATEWAY, **extra: object) -> Entry:
    return Entry(owner="0x" + "22" * 20, id=address.encode(), **extra)  # type: ignore[arg-type]


async def test_identity_answers_as_the_node_with_a_signature_over_key_and_ip(
    start_node: StartNode, key_file: Path
) -> None:
    client = await start_node()
    status, answer = await signed(client, "/challenge", SCHEDULER_KEY, IDENTITY)
    assert status == 200, answer
    node = Signer.from_file(key_file)
    assert set(answer) == {"publicKey", "ipAddress", "signature", "gpuStats"}
    assert answer["publicKey"] == node.address
    assert answer["ipAddress"] == "203.0.113.7"
    assert isinstance(answer["gpuStats"], list)
    raw = base64.b64decode(answer["signature"])
    assert len(raw) == 65 and raw[64] in (0, 1)  # go-ethereum's crypto.Sign layout
    digest = keccak256(node.public_key + b".203.0.113.7")
    recovered = Signature(raw).recover_public_key_from_msg_hash(digest)
    assert recovered.to_checksum_address() == node.address


async def test_matrix_multiplication_given_matrices(start_node: StartNode) -> None:
    client = await start_node()
    payload = {"A": [[1, 2], [3, 4]], "B": [[5, 6], [7, 8]]}
    status, answer = await signed(
        client, "/challenge", SCHEDULER_KEY, {"type": "MATRIX_MULTIPLICATION", "payload": payload}
    )
    assert status == 200, answer
    assert answer["C"] == [[19, 22], [43, 50]]
    assert answer["matrixSize"] == 2 and answer["flops"] == 16
    assert answer["backend"] == "cpu" and answer["device"] == "CPU"
    assert answer["deviceInfo"] == {
        "name": "CPU", "computeCapability": "N/A", "memoryGB": 0, "cudaCores": 0
    }
    assert answer["resultSamples"] == [
        {"row": 0, "col": 0, "value": 19.0}, {"row": 1, "col": 1, "value": 50.0}
    ]
    text = "".join(f"{v:.6f}" for v in (19, 22, 43, 50))
    assert answer["merkleRoot"] == "0x" + __import__("hashlib").sha256(text.encode()).hexdigest()
    assert answer["computationTimeMs"] > 0 and answer["gflops"] > 0


async def test_matrix_multiplication_by_size_and_the_matrix_spellings(
    start_node: StartNode,
) -> None:
    client = await start_node(max_matrix_size=128)
    status, answer = await signed(
        client, "/challenge", SCHEDULER_KEY,
        {"type": "MATRIX_MULTIPLICATION", "payload": {"size": 120}},
    )
    assert status == 200, answer
    assert answer["matrixSize"] == 120 and "C" not in answer  # C only up to 100
    assert answer["flops"] == 2 * 120**3
    assert [(s["row"], s["col"]) for s in answer["resultSamples"]] == [(0, 0), (60, 60)]
    assert all(0 <= s["value"] <= 120 for s in answer["resultSamples"])  # [0,1) factors
    status, answer = await signed(
        client, "/challenge", SCHEDULER_KEY,
        {"type": "MATRIX_MULTIPLICATION",
         "payload": {"matrixA": [[2, 0, 1]], "matrixB": [[1], [1], [1]], "A": [[9]]}},
    )
    assert status == 200 and answer["C"] == [[3]] and answer["matrixSize"] == 1
    status, answer = await signed(
        client, "/challenge", SCHEDULER_KEY,
        {"type": "MATRIX_MULTIPLICATION", "payload": {"size": 129}},
    )
    assert status == 400
    assert answer["error"]["message"] == "size 129 is over this node's limit of 128"


async def test_a_challenge_over_the_budget_is_refused_and_inference_goes_on(
    start_node: StartNode,
) -> None:
    """A 52 KB body asks for a 16M-element product (4096x1 by 1x4096): refused by elements,
    as is a square over the default budget; one within it runs off the event loop while
    signed inference requests are served, one after another, until it is done."""
    client = await start_node()
    for payload in ({"A": [[1.0]] * 4096, "B": [[1.0] * 4096]}, {"size": 4096}):
        body = {"type": "MATRIX_MULTIPLICATION", "payload": payload}
        status, answer = await signed(client, "/challenge", SCHEDULER_KEY, body)
        assert status == 400, answer
        assert answer["error"]["code"] == "matrix_too_large"
        assert "node.max_matrix_elements" in answer["error"]["message"]
    big = {"type": "MATRIX_MULTIPLICATION", "payload": {"size": 1024, "backend": "cpu"}}
    challenge = asyncio.create_task(signed(client, "/challenge", SCHEDULER_KEY, big))
    served = 0
    while not challenge.done():
        status, answer = await signed(client, "/v1/chat/completions", SCHEDULER_KEY, CHAT)
        assert status == 200, answer
        served += 1
    status, answer = await challenge
    assert status == 200 and answer["matrixSize"] == 1024
    assert served >= 3, served


async def test_bad_matrix_payloads_get_clear_400s(start_node: StartNode) -> None:
    client = await start_node()
    cases = {
        "{}": "either 'size' or both 'A' and 'B' matrices must be provided",
        '{"A": [[1, 2]], "B": [[1, 2]]}': "matrix dimensions are not compatible",
        '{"A": [[1, 2], [3]], "B": [[1], [2]]}': "the rows of A must all have the same length",
        '{"A": [["1"]], "B": [[1]]}': "A must be a non-empty list of rows of numbers",
        '{"size": "8"}': "size must be an integer",
        '"nope"': "invalid payload for matrix multiplication challenge",
    }
    for payload, message in cases.items():
        body = {"type": "MATRIX_MULTIPLICATION", "payload": json.loads(payload)}
        status, answer = await signed(client, "/challenge", SCHEDULER_KEY, body)
        assert status == 400, payload
        assert answer["error"]["message"].startswith(message), (payload, answer)


async def test_endpoint_reachable(start_node: StartNode, aiohttp_server: object) -> None:
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="fine")

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404)

    target = web.Application()
    target.router.add_get("/ok", ok)
    target.router.add_get("/missing", missing)
    server = await aiohttp_server(target)  # type: ignore[operator]
    client = await start_node()
    challenge = {"type": "ENDPOINT_REACHABLE", "payload": str(server.make_url("/ok"))}
    assert await signed(client, "/challenge", SCHEDULER_KEY, challenge) == (
        200, {"reachable": True}
    )
    assert not any(k.lower().startswith("x-") or k.lower() == "authorization" for k in seen[0])
    challenge["payload"] = str(server.make_url("/missing"))
    assert await signed(client, "/challenge", SCHEDULER_KEY, challenge) == (
        200, {"reachable": False}
    )
    challenge["payload"] = f"http://127.0.0.1:{free_port()}/"
    status, answer = await signed(client, "/challenge", SCHEDULER_KEY, challenge)
    assert status == 500
    assert answer["error"]["message"] == "failed to reach endpoint: Connection refused"
    challenge["payload"] = {"url": "http://127.0.0.1/"}
    status, answer = await signed(client, "/challenge", SCHEDULER_KEY, challenge)
    assert status == 400
    assert answer["error"]["message"] == "invalid payload for endpoint reachability challenge"


async def test_unknown_type_and_bad_body_are_the_nodes_400s(start_node: StartNode) -> None:
    client = await start_node()
    status, answer = await signed(client, "/challenge", SCHEDULER_KEY, {"type": "DANCE"})
    assert status == 400 and answer["error"]["message"] == "unknown challenge type: DANCE"
    status, answer = await signed(client, "/challenge", SCHEDULER_KEY, [1, 2])
    assert status == 400 and answer["error"]["message"] == "Invalid request body"
    assert await metric(
        client, "model_proxy_node_challenges_total", type="other", outcome="bad_request"
    ) == 2


async def test_health_answers_ok_as_text_without_credentials(start_node: StartNode) -> None:
    client = await start_node()
    response = await client.get("/health")
    assert response.status == 200 and await response.text() == "OK"
    assert response.content_type == "text/plain"


async def test_challenge_refused_for_gateways_api_keys_and_no_signature(
    start_node: StartNode, chain: FakeChain
) -> None:
    chain.gateways.append(gateway_entry())
    client = await start_node()
    await eventually(lambda: _accepted(client, GATEWAY_KEY))  # the gateway is trusted on /v1
    status, answer = await signed(client, "/challenge", GATEWAY_KEY, IDENTITY)
    assert status == 401 and answer["error"]["code"] == "unknown_address"
    response = await client.post("/challenge", json=IDENTITY)
    assert response.status == 401
    assert await metric(
        client, "model_proxy_node_challenges_total", type="none", outcome="unauthorized"
    ) == 2


async def test_scheduler_may_also_send_inference(start_node: StartNode) -> None:
    client = await start_node(rpc_url=None)  # no chain: the scheduler is still trusted
    assert await _accepted(client, SCHEDULER_KEY)
    assert not await _accepted(client, GATEWAY_KEY)


async def _accepted(client: TestClient, key: str) -> bool:
    status, answer = await signed(client, "/v1/chat/completions", key, CHAT)
    assert status in (200, 401), answer
    return status == 200


async def test_gateway_added_then_paused_on_the_chain(
    start_node: StartNode, chain: FakeChain
) -> None:
    client = await start_node()
    await eventually(lambda: _metric_positive(client, "model_proxy_node_registry_age_seconds"))
    assert not await _accepted(client, GATEWAY_KEY)
    chain.gateways.append(gateway_entry())
    await eventually(lambda: _accepted(client, GATEWAY_KEY))
    assert await metric(client, "model_proxy_node_gateways") == 1
    chain.gateways[0].paused = True
    await eventually(lambda: _refused(client, GATEWAY_KEY))


async def test_paused_entries_are_refused_even_if_a_registry_returns_them(
    start_node: StartNode, chain: FakeChain
) -> None:
    chain.live_filters_paused = False
    chain.gateways.append(gateway_entry(paused=True))
    other = "0x" + "ab" * 20
    chain.gateways.append(Entry(owner=GATEWAY, id=bytes.fromhex(other[2:])))  # raw 20-byte id
    client = await start_node()
    await eventually(lambda: _metric_equals(client, "model_proxy_node_gateways", 1))
    assert not await _accepted(client, GATEWAY_KEY)  # the owner is not the signer


async def _refused(client: TestClient, key: str) -> bool:
    return not await _accepted(client, key)


async def _metric_positive(client: TestClient, name: str) -> bool:
    return await metric(client, name) >= 0


async def _metric_equals(client: TestClient, name: str, value: float) -> bool:
    return await metric(client, name) == value


async def test_rpc_down_at_start_then_up(
    start_node: StartNode, chain: FakeChain, chain_server: object
) -> None:
    chain.gateways.append(gateway_entry())
    chain.mode = "http_error"
    client = await start_node()
    await eventually(
        lambda: _metric_at_least(client, "model_proxy_node_registry_failures_total", 2,
                                 reason="http")
    )
    assert not await _accepted(client, GATEWAY_KEY)
    assert await _accepted(client, SCHEDULER_KEY)  # inference and the scheduler unaffected
    status, _ = await signed(client, "/challenge", SCHEDULER_KEY, IDENTITY)
    assert status == 200
    chain.mode = "ok"
    await eventually(lambda: _accepted(client, GATEWAY_KEY))


async def test_rpc_unreachable_at_start(start_node: StartNode) -> None:
    client = await start_node(rpc_url=f"http://127.0.0.1:{free_port()}/")
    await eventually(
        lambda: _metric_at_least(client, "model_proxy_node_registry_failures_total", 1,
                                 reason="unreachable")
    )
    assert await _accepted(client, SCHEDULER_KEY)
    assert (await client.get("/healthz")).status == 200


async def test_rpc_failures_mid_run_keep_the_last_good_list(
    start_node: StartNode, chain: FakeChain
) -> None:
    chain.gateways.append(gateway_entry())
    client = await start_node()
    await eventually(lambda: _accepted(client, GATEWAY_KEY))
    for mode, reason in (
        ("http_error", "http"), ("rpc_error", "rpc_error"), ("bad_abi", "malformed"),
        ("bad_hex", "malformed"), ("not_json", "malformed"),
    ):
        chain.mode = mode
        before = await metric(client, "model_proxy_node_registry_failures_total", reason=reason)
        await eventually(
            lambda r=reason, b=before: _metric_at_least(  # type: ignore[misc]
                client, "model_proxy_node_registry_failures_total", b + 1, reason=r
            )
        )
        assert await _accepted(client, GATEWAY_KEY), mode  # the last good list stays
        assert await metric(client, "model_proxy_node_gateways") == 1


async def _metric_at_least(client: TestClient, name: str, value: float, **labels: str) -> bool:
    return await metric(client, name, **labels) >= value


async def test_static_allow_list_still_works_without_a_chain(
    start_proxy: object, key_file: Path
) -> None:
    from tests.node.conftest import node_config

    config = node_config(key_file, None)
    config["auth"] = {"fxn_signatures": {"allowed_addresses": [GATEWAY], "window": 0}}
    client = await start_proxy(config)  # type: ignore[operator]
    assert await _accepted(client, GATEWAY_KEY)
    # window 0: no timestamp window, as the node; the nonce still refuses a replay (and a
    # timestamp from before the proxy started is refused as before_start)
    body = json.dumps(CHAT).encode()
    stamp = str(int(time.time()) + 1)
    headers = send_request_headers(GATEWAY_KEY, body, timestamp=stamp, nonce="abc")
    first = await client.post("/v1/chat/completions", data=body, headers=headers)
    assert first.status == 200
    again = await client.post("/v1/chat/completions", data=body, headers=headers)
    assert again.status == 401 and (await again.json())["error"]["code"] == "replayed"


async def test_reload_keeps_node_mode_and_the_chain_list(
    aiohttp_client: object, key_file: Path, chain: FakeChain, chain_server: object,
    tmp_path: Path, caplog: object,
) -> None:
    import logging

    import yaml

    from proxy.config import load_config
    from proxy.server.app import create_app
    from proxy.server.reload import RELOADER
    from tests.conftest import upstream_url
    from tests.node.conftest import node_config

    chain.gateways.append(gateway_entry())
    config = node_config(key_file, upstream_url(chain_server) + "/")  # type: ignore[arg-type]
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump(config))
    client = await aiohttp_client(  # type: ignore[operator]
        create_app(load_config(path), config_path=str(path))
    )
    await eventually(lambda: _accepted(client, GATEWAY_KEY))
    extra_key = "7" * 64
    assert not await _accepted(client, extra_key)
    config["node"]["scheduler_address"] = GATEWAY  # asks for what only a restart can do
    config["auth"] = {"api_keys": ["inbound-key"],
                      "fxn_signatures": {"allowed_addresses": [address_of(extra_key)]}}
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING, logger="model_proxy"):  # type: ignore[attr-defined]
        assert await client.app[RELOADER].reload()
    assert "node cannot change while running" in caplog.text  # type: ignore[attr-defined]
    assert await _accepted(client, GATEWAY_KEY)  # the chain's gateway, still
    status, _ = await signed(client, "/challenge", GATEWAY_KEY, IDENTITY)
    assert status == 401  # the scheduler is still the one the node started with
    keyed = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"x-api-key": "inbound-key"}
    )
    assert keyed.status == 200  # the rest of the reload applied
    assert await _accepted(client, extra_key)  # static addresses change on reload
