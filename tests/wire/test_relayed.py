"""Renaming and usage reading on the bytes of OpenAI-compatible answers."""

from __future__ import annotations

import json

import orjson

from proxy.wire.events import HeldBack
from proxy.wire.relayed import Relayed, ask_usage


def event(obj: object, spaced: bool = False) -> bytes:
    text = json.dumps(obj) if spaced else orjson.dumps(obj).decode()
    return f"data: {text}\n\n".encode()


def chunk(i: int, model: str = "up-7b") -> dict[str, object]:
    return {"id": "c", "object": "chat.completion.chunk", "model": model, "usage": None,
            "choices": [{"index": 0, "delta": {"content": f'say "model":"x" {i}'}}]}


USAGE = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
         "prompt_tokens_details": {"cached_tokens": 0}}
LAST = {"id": "c", "object": "chat.completion.chunk", "model": "up-7b", "choices": [],
        "usage": USAGE}


def stream(spaced: bool) -> bytes:
    return (event(chunk(0), spaced) + event(chunk(1), spaced) + event(LAST, spaced)
            + b"data: [DONE]\n\n")


def relay(data: bytes, cut: int, relayed: Relayed) -> bytes:
    out = relayed.chunk(data[:cut]) + relayed.chunk(data[cut:]) + relayed.end()
    relayed.complete = True
    return out


def test_a_stream_cut_anywhere_is_renamed_and_its_usage_read() -> None:
    for spaced in (False, True):
        data = stream(spaced)
        for cut in range(1, len(data)):
            relayed = Relayed("public", drop_usage=True)
            out = relay(data, cut, relayed)
            parts = out.split(b"\n\n")
            assert parts[-2:] == [b"data: [DONE]", b""], (spaced, cut)
            got = [json.loads(p[6:]) for p in parts[:-2]]
            assert got == [{**chunk(0), "model": "public"}, {**chunk(1), "model": "public"}]
            assert relayed.usage == USAGE
            assert relayed.tokens()[:2] == (4, 2)


def test_the_usage_event_stays_when_the_client_asked() -> None:
    relayed = Relayed("public")
    out = relay(stream(False), 10, relayed)
    assert json.loads(out.split(b"\n\n")[2][6:]) == {**LAST, "model": "public"}


def test_usage_on_a_content_chunk_keeps_the_content() -> None:
    both = {**chunk(5), "usage": USAGE}
    relayed = Relayed("public", drop_usage=True)
    out = relayed.chunk(event(both).replace(b"\n\n", b"\r\n\r\n") + b"data: [DONE]\n\n")
    first, rest = out.split(b"\n\n", 1)
    assert json.loads(first[6:]) == {k: v for k, v in {**both, "model": "public"}.items()
                                     if k != "usage"}
    assert rest == b"data: [DONE]\n\n" and relayed.usage == USAGE


def test_a_body_is_renamed_once_and_its_usage_cut_out() -> None:
    body = orjson.dumps({"choices": [{"message": {"content": '"model":"up-7b"'}}],
                         "model": "up-7b", "usage": USAGE})
    relayed = Relayed("pub\"lic")
    out = orjson.loads(relayed.body(body))
    assert out["model"] == 'pub"lic'
    assert out["choices"][0]["message"]["content"] == '"model":"up-7b"'
    assert relayed.usage == USAGE and relayed.complete
    nothing = Relayed("public")
    assert nothing.body(b'{"model": null, "data": []}') == b'{"model": null, "data": []}'
    assert nothing.usage is None


def test_ask_usage_keeps_the_clients_other_options() -> None:
    payload = {"stream_options": {"continuous_usage_stats": False}}
    assert ask_usage(payload)
    assert payload == {"stream_options": {"continuous_usage_stats": False, "include_usage": True}}
    assert not ask_usage(payload)
    bare: dict[str, object] = {}
    assert ask_usage(bare) and bare == {"stream_options": {"include_usage": True}}


def test_compact_answers_are_renamed_on_their_bytes() -> None:
    """The fast path: an ordinary upstream's bytes are kept as they were written (a parse
    and serialise would turn ``-1.50`` into ``-1.5``), only the name replaced."""
    spelled = b'"logprob":-1.50,'
    events = [b'data: {"id":"c","model":"up-7b",' + spelled + b'"usage":null,"choices":[]}\n\n'
              for _ in range(3)]
    relayed = Relayed("public", drop_usage=True)
    out = b"".join(relayed.chunk(e) for e in events)
    assert out == b"".join(events).replace(b'"up-7b"', b'"public"')
    body = b'{"id":"c","model":"up-7b",' + spelled + b'"usage":{"prompt_tokens":1}}'
    whole = Relayed("public")
    assert whole.body(body) == body.replace(b'"up-7b"', b'"public"')
    assert whole.tokens()[0] == 1


def test_counts_that_are_not_counts_are_left_out() -> None:
    for bad in (-1, 2**31, "3", [3], {"n": 3}, True, 2.0):
        relayed = Relayed("public")
        relayed.body(orjson.dumps({"model": "m", "usage": {"prompt_tokens": bad,
                                                           "completion_tokens": 7}}))
        assert relayed.tokens()[:2] == (None, 7) and relayed.tokens()[3], bad
    fine = Relayed("public")
    fine.body(b'{"model":"m","usage":{"prompt_tokens":2147483647,"completion_tokens":0}}')
    assert fine.tokens()[:2] == (2**31 - 1, 0) and not fine.tokens()[3]


def test_an_embeddings_list_naming_its_model_last_is_renamed_on_its_bytes() -> None:
    """OpenAI's embeddings list names its model after ``data``: proven from the end, the
    vectors are not parsed (``0.50`` stays as written)."""
    body = (b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.50,-1]}],'
            b'"model":"up-emb","usage":{"prompt_tokens":3,"total_tokens":3}}')
    relayed = Relayed("public")
    assert relayed.body(body) == body.replace(b'"up-emb"', b'"public"')
    assert relayed.tokens()[0] == 3
    nested = b'{"data":[{"x":1,"model":"up-emb"}],"model":"up-emb","usage":{"a":{"b":{}}}}'
    out = orjson.loads(Relayed("public").body(nested))
    assert out["model"] == "public" and out["data"][0]["model"] == "up-emb"


def walked(relayed: Relayed, parts: list[bytes]) -> bytes:
    """What the event-by-event walk (``Relayed._events``) makes of ``parts``, each read cut
    into whole events as ``Relayed.chunk`` cuts them."""
    out = b""
    for part in parts:
        if relayed.events is not None or not part.endswith(b"\n\n"):
            if relayed.events is None:
                relayed.events = HeldBack(relayed.max_event)
            part = relayed.events.feed(part)
        if part:
            out += relayed._events(part)
    return out + relayed.end()


def test_reads_without_escapes_come_out_as_the_event_by_event_walk_makes_them() -> None:
    """A read with no backslash is renamed with one replace and its usages read from the
    renamed bytes; it must give what the event-by-event walk gives, wherever the stream is
    cut, with ``"usage":null`` on every event, a usage on a content event and a usage-only
    event, whether or not the client asked for the usage."""
    plain = {"id": "c", "object": "chat.completion.chunk", "model": "up-7b", "usage": None,
             "choices": [{"index": 0, "delta": {"content": "plain words"}}]}
    data = (event(plain) + event({**plain, "usage": USAGE}) + event(plain) + event(LAST)
            + b"data: [DONE]\n\n")
    assert b"\\" not in data
    for drop in (True, False):
        for cut in range(1, len(data)):
            fast = Relayed("public", drop_usage=drop)
            slow = Relayed("public", drop_usage=drop)
            out = fast.chunk(data[:cut]) + fast.chunk(data[cut:]) + fast.end()
            assert out == walked(slow, [data[:cut], data[cut:]]), (drop, cut)
            assert b'"up-7b"' not in out
            assert fast.usage == slow.usage == USAGE, (drop, cut)
