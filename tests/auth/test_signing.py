"""Function Network request signatures: known answers, round trips, tampering, replay, bounds."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from eth_keys.constants import SECPK1_N
from multidict import CIMultiDict

from proxy.auth.signing import (
    REASONS,
    SECP256K1_N,
    SIGNATURE_HEADERS,
    AllowList,
    Signer,
    Verifier,
    eip191_digest,
    signing_message,
)
from proxy.errors import Unauthorized
from tests.fakes.fxn_node import eip191_digest as independent_digest
from tests.fakes.fxn_node import (
    gateway_headers,
    recover_signer,
)

KEY_A = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
KEY_B = bytes(31) + b"\x07"
NOW = 1_750_000_000
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


class Clock:
    """A settable clock for the verifier's window and the signer's timestamps."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def signer(clock: Clock) -> Signer:
    return Signer(KEY_A, clock=clock)


@pytest.fixture
def other() -> Signer:
    return Signer(KEY_B)


@pytest.fixture
def verifier(clock: Clock, signer: Signer, other: Signer) -> Verifier:
    return Verifier([signer.address, other.address], clock=clock)


def reason(verifier: Verifier, headers: Mapping[str, str], body: bytes = BODY) -> str:
    with pytest.raises(Unauthorized) as info:
        verifier.verify(headers, body)
    assert info.value.status == 401
    assert info.value.code in REASONS
    return str(info.value.code)


def with_signature_byte(headers: dict[str, str], index: int, value: int) -> dict[str, str]:
    raw = bytearray(bytes.fromhex(headers["X-Signature"]))
    raw[index] = value
    return {**headers, "X-Signature": raw.hex()}


# -- known answers and agreement with an independent implementation -------------------------


def test_eip191_known_answer() -> None:
    expected = "3e2d111c8c52a5ef0ba64fe4d85e32a5153032367ec44aaae0a4e2d1bfb9bebd"
    assert eip191_digest("test message").hex() == expected
    assert independent_digest(b"test message").hex() == expected


def test_curve_order_matches_eth_keys() -> None:
    assert SECP256K1_N == SECPK1_N


def test_message_layout() -> None:
    assert signing_message(b"", "17", "n") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855.17.n"
    )


def test_signature_matches_independent_signer(signer: Signer) -> None:
    # RFC 6979 signatures are deterministic, so two implementations must agree byte for byte.
    ours = signer.headers(BODY, timestamp="1750000000", nonce="abc123")
    theirs = gateway_headers(KEY_A, BODY, timestamp="1750000000", nonce="abc123")
    assert ours == theirs
    assert ours["X-Address"] == "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
    raw = bytes.fromhex(ours["X-Signature"])
    assert len(raw) == 65 and raw[64] in (27, 28)
    assert not ours["X-Signature"].startswith("0x")
    assert recover_signer(BODY, "1750000000", "abc123", ours["X-Signature"]) == signer.address


# -- round trip -----------------------------------------------------------------------------


def test_round_trip(signer: Signer, verifier: Verifier) -> None:
    assert verifier.verify(signer.headers(BODY), BODY) == signer.address


def test_independently_signed_request_verifies(verifier: Verifier) -> None:
    headers = gateway_headers(KEY_A, BODY, timestamp=str(NOW), nonce="gw-1")
    assert verifier.verify(headers, BODY) == Signer(KEY_A).address


def test_each_call_has_fresh_timestamp_and_nonce(signer: Signer, clock: Clock) -> None:
    first = signer.headers(BODY)
    clock.now += 7
    second = signer.headers(BODY)
    assert first["X-Nonce"] != second["X-Nonce"]
    assert int(second["X-Timestamp"]) - int(first["X-Timestamp"]) == 7
    assert first["X-Signature"] != second["X-Signature"]


@pytest.mark.parametrize(
    "variant",
    [
        lambda h: {**h, "X-Signature": "0x" + h["X-Signature"]},
        lambda h: {**h, "X-Signature": "0X" + h["X-Signature"].upper()},
        lambda h: {**h, "X-Address": h["X-Address"].lower()},
        lambda h: {**h, "X-Address": "0x" + h["X-Address"][2:].upper()},
    ],
    ids=["0x-prefix", "upper-hex", "lower-address", "upper-address"],
)
def test_accepted_spellings(signer: Signer, verifier: Verifier, variant: object) -> None:
    assert callable(variant)
    assert verifier.verify(variant(signer.headers(BODY)), BODY) == signer.address


# -- tampering ------------------------------------------------------------------------------


def test_body_byte_flipped(signer: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY)
    tampered = bytearray(BODY)
    tampered[10] ^= 0x01
    assert reason(verifier, headers, bytes(tampered)) == "bad_signature"
    assert reason(verifier, headers, BODY + b" ") == "bad_signature"


def test_timestamp_changed(signer: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY)
    changed = {**headers, "X-Timestamp": str(int(headers["X-Timestamp"]) - 1)}
    assert reason(verifier, changed) == "bad_signature"
    # Same number, different text: the signature covers the text as sent.
    assert (
        reason(verifier, {**headers, "X-Timestamp": "0" + headers["X-Timestamp"]})
        == "bad_signature"
    )


def test_nonce_changed(signer: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY)
    assert reason(verifier, {**headers, "X-Nonce": headers["X-Nonce"] + "0"}) == "bad_signature"


def test_address_changed(signer: Signer, other: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY)
    assert reason(verifier, {**headers, "X-Address": other.address}) == "bad_signature"
    stranger = "0x" + "12" * 20
    assert reason(verifier, {**headers, "X-Address": stranger}) == "unknown_address"


def test_unlisted_signer(verifier: Verifier) -> None:
    outsider = Signer(bytes(31) + b"\x09")
    assert reason(verifier, outsider.headers(BODY)) == "unknown_address"


@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_signature_byte_flipped(signer: Signer, verifier: Verifier, index: int) -> None:
    headers = signer.headers(BODY)
    original = bytes.fromhex(headers["X-Signature"])[index]
    assert reason(verifier, with_signature_byte(headers, index, original ^ 0x01)) == "bad_signature"


def test_v_value(signer: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY)
    v = bytes.fromhex(headers["X-Signature"])[64]
    assert reason(verifier, with_signature_byte(headers, 64, 55 - v)) == "bad_signature"
    for bad_v in (0, 1, 26, 29, 255):
        assert reason(verifier, with_signature_byte(headers, 64, bad_v)) == "bad_v"


def test_high_s_twin_refused(signer: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY)
    raw = bytes.fromhex(headers["X-Signature"])
    s = int.from_bytes(raw[32:64], "big")
    twin = raw[:32] + (SECPK1_N - s).to_bytes(32, "big") + bytes([55 - raw[64]])
    assert reason(verifier, {**headers, "X-Signature": twin.hex()}) == "bad_signature"


@pytest.mark.parametrize(
    ("signature", "expected"),
    [
        ("zz" * 65, "bad_hex"),
        ("0x" + "g" * 130, "bad_hex"),
        ("ab" * 64 + "a", "bad_hex"),
        ("ab" * 64, "bad_length"),
        ("ab" * 66, "bad_length"),
        ("0x", "bad_length"),
        ("00" * 64 + "1b", "bad_signature"),
    ],
)
def test_malformed_signature(
    signer: Signer, verifier: Verifier, signature: str, expected: str
) -> None:
    assert reason(verifier, {**signer.headers(BODY), "X-Signature": signature}) == expected


@pytest.mark.parametrize("name", SIGNATURE_HEADERS)
def test_missing_or_empty_header(signer: Signer, verifier: Verifier, name: str) -> None:
    headers = signer.headers(BODY)
    assert reason(verifier, {k: v for k, v in headers.items() if k != name}) == "missing_header"
    assert reason(verifier, {**headers, name: ""}) == "missing_header"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("X-Address", "0x123", "bad_address"),
        ("X-Address", "2c7536E3605D9C16a7a3D7b1898e529396a65c23", "bad_address"),
        ("X-Address", "0x" + "zz" * 20, "bad_address"),
        ("X-Timestamp", "-1750000000", "bad_timestamp"),
        ("X-Timestamp", "1.75e9", "bad_timestamp"),
        ("X-Timestamp", " 1750000000", "bad_timestamp"),
        ("X-Timestamp", "\u0661\u0667\u0665\u0660", "bad_timestamp"),
        ("X-Timestamp", "9" * 16, "bad_timestamp"),
        ("X-Nonce", "has space", "bad_nonce"),
        ("X-Nonce", "x" * 129, "bad_nonce"),
        ("X-Nonce", "tab\there", "bad_nonce"),
        ("X-Nonce", "caf\u00e9", "bad_nonce"),
    ],
)
def test_malformed_fields(
    signer: Signer, verifier: Verifier, name: str, value: str, expected: str
) -> None:
    assert reason(verifier, {**signer.headers(BODY), name: value}) == expected


def test_messages_do_not_echo_header_values(signer: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY)
    for bad in (
        {**headers, "X-Signature": "ab" * 64},
        {**headers, "X-Nonce": headers["X-Nonce"] + "!"},
        {**headers, "X-Address": "0x" + "34" * 20},
    ):
        with pytest.raises(Unauthorized) as info:
            verifier.verify(bad, BODY)
        text = str(info.value)
        assert bad["X-Signature"] not in text and bad["X-Nonce"] not in text
        assert bad["X-Address"].lower() not in text.lower()


# -- replay and the timestamp window --------------------------------------------------------


def test_replay_rejected(signer: Signer, other: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY, nonce="once")
    verifier.verify(headers, BODY)
    assert reason(verifier, headers) == "replayed"
    # The same nonce from another signer is that signer's own, not a replay.
    assert verifier.verify(other.headers(BODY, timestamp=str(NOW), nonce="once"), BODY)


def test_precheck_needs_no_body(signer: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY)
    verifier.precheck(headers)
    with pytest.raises(Unauthorized) as info:
        verifier.precheck({**headers, "X-Timestamp": str(NOW - 1000)})
    assert info.value.code == "stale"
    assert verifier.verify(headers, BODY) == signer.address  # precheck used nothing up
    with pytest.raises(Unauthorized) as info:
        verifier.precheck(headers)
    assert info.value.code == "replayed"


def test_failed_attempt_does_not_burn_nonce(signer: Signer, verifier: Verifier) -> None:
    headers = signer.headers(BODY, nonce="n-1")
    assert reason(verifier, headers, BODY + b"x") == "bad_signature"
    assert len(verifier.nonces) == 0
    assert verifier.verify(headers, BODY) == signer.address


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(-301, "stale"), (-10_000, "stale"), (301, "future"), (10_000, "future")],
)
def test_outside_window(signer: Signer, verifier: Verifier, offset: int, expected: str) -> None:
    headers = signer.headers(BODY, timestamp=str(NOW + offset))
    assert reason(verifier, headers) == expected


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_window_edges_accepted(signer: Signer, verifier: Verifier, offset: int) -> None:
    assert verifier.verify(signer.headers(BODY, timestamp=str(NOW + offset)), BODY)


def test_custom_window(signer: Signer, clock: Clock) -> None:
    narrow = Verifier([signer.address], window=5, clock=clock)
    assert reason(narrow, signer.headers(BODY, timestamp=str(NOW - 6))) == "stale"
    assert narrow.verify(signer.headers(BODY, timestamp=str(NOW - 5)), BODY)


def test_replay_after_expiry_is_stale(signer: Signer, verifier: Verifier, clock: Clock) -> None:
    headers = signer.headers(BODY)
    verifier.verify(headers, BODY)
    clock.now += 301
    assert reason(verifier, headers) == "stale"


# -- the nonce cache's bounds ---------------------------------------------------------------


def test_cache_bounded_in_time(signer: Signer, verifier: Verifier, clock: Clock) -> None:
    for i in range(50):
        verifier.verify(signer.headers(BODY, nonce=f"t-{i}"), BODY)
    assert len(verifier.nonces) == 50
    clock.now += 301  # every entry's timestamp is now outside the window
    verifier.verify(signer.headers(BODY, nonce="after"), BODY)
    assert len(verifier.nonces) == 1


def test_cache_expiry_follows_signed_timestamp(
    signer: Signer, verifier: Verifier, clock: Clock
) -> None:
    # A future-dated message stays acceptable longer, so its nonce must be kept longer.
    future = signer.headers(BODY, timestamp=str(NOW + 300), nonce="future")
    verifier.verify(future, BODY)
    clock.now += 599
    verifier.nonces.expire(clock.now)
    assert len(verifier.nonces) == 1
    assert reason(verifier, future) == "replayed"
    clock.now += 2
    assert reason(verifier, future) == "stale"
    assert len(verifier.nonces) == 0


def test_cache_bounded_in_memory_without_replay_hole(signer: Signer, clock: Clock) -> None:
    verifier = Verifier([signer.address], max_nonces=3, clock=clock)
    sent = []
    for i in range(10):
        headers = signer.headers(BODY, timestamp=str(NOW - 100 + i), nonce=f"m-{i}")
        verifier.verify(headers, BODY)
        sent.append(headers)
        assert len(verifier.nonces) <= 3
    # Every request, remembered or forgotten, is still refused: no replay slips through.
    for headers in sent:
        assert reason(verifier, headers) in {"replayed", "replay_cache_full"}
    assert reason(verifier, sent[0]) == "replay_cache_full"
    assert reason(verifier, sent[-1]) == "replayed"
    # Fresh traffic still passes; only the oldest part of the window is narrowed.
    assert verifier.verify(signer.headers(BODY, nonce="fresh"), BODY)
    assert len(verifier.nonces) == 3


def test_nonce_cache_survives_new_limits(signer: Signer, clock: Clock) -> None:
    # A reloaded config builds a new verifier around the old cache: no replay hole opens,
    # even when the window grows.
    old = Verifier([signer.address], window=10, clock=clock)
    headers = signer.headers(BODY, timestamp=str(NOW - 5))
    old.verify(headers, BODY)
    new = Verifier([signer.address], window=600, max_nonces=5, clock=clock, nonces=old.nonces)
    clock.now += 100
    assert reason(new, headers) == "replayed"
    assert new.nonces.max_entries == 5


def test_duplicate_signature_headers(signer: Signer, verifier: Verifier) -> None:
    headers = CIMultiDict(signer.headers(BODY))
    headers.add("X-Nonce", "second")
    assert reason(verifier, headers) == "duplicate_header"


def test_verifier_configuration_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        Verifier([])
    with pytest.raises(ValueError, match="#1"):
        Verifier(["0x" + "ab" * 20, "not-an-address"])
    with pytest.raises(ValueError, match="positive"):
        Verifier(["0x" + "ab" * 20], window=0)


def test_reason_codes_are_a_fixed_set() -> None:
    assert all(code.isidentifier() and code.islower() for code in REASONS)


def test_live_allow_list_is_read_on_every_request(clock: Clock, signer: Signer) -> None:
    live = AllowList()
    verifier = Verifier([], live=live, clock=clock)
    assert reason(verifier, signer.headers(BODY)) == "unknown_address"
    live.replace([signer.address.upper().replace("0X", "0x")])
    assert verifier.verify(signer.headers(BODY), BODY) == signer.address
    live.replace([])
    assert reason(verifier, signer.headers(BODY)) == "unknown_address"
    with pytest.raises(ValueError, match="empty"):
        Verifier([], clock=clock)
    with pytest.raises(ValueError, match="#0"):
        AllowList(["0x123"])


def test_no_window_accepts_any_timestamp_but_never_a_replay(clock: Clock, signer: Signer) -> None:
    verifier = Verifier([signer.address], window=float("inf"), max_nonces=2, clock=clock)
    old = signer.headers(BODY, timestamp="1000", nonce="n1")
    assert verifier.verify(old, BODY) == signer.address
    assert reason(verifier, old) == "replayed"
    clock.now += 10**9  # a decade later the nonce is still remembered
    assert reason(verifier, old) == "replayed"
    verifier.verify(signer.headers(BODY, timestamp="2000", nonce="n2"), BODY)
    verifier.verify(signer.headers(BODY, timestamp="3000", nonce="n3"), BODY)  # n1 forgotten
    assert reason(verifier, old) == "replay_cache_full"  # but never accepted again
    with pytest.raises(ValueError, match="positive"):
        Verifier([signer.address], window=0)
