"""The router of ``routing: prefix`` and ``session`` as pure functions: keys, rendezvous
order, bounded loads, and what a vLLM ``/metrics`` page is read as."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from proxy.adapters.base import Job
from proxy.config import BalanceSection
from proxy.upstream import balance
from proxy.upstream.signals import Signals, ollama_loaded, read_vllm_metrics

OPTIONS = BalanceSection()


@dataclass(eq=False)
class Url:
    url: str
    active: int = 0
    signals: Signals = field(default_factory=Signals)

    @property
    def seed(self) -> int:
        return balance.url_seed(self.url)


def urls(n: int) -> list[Url]:
    return [Url(f"http://10.0.0.{i}:8000") for i in range(n)]


def chat_job(messages: list[dict[str, object]], **extra: object) -> Job:
    payload = {"model": "m", "messages": messages, **extra}
    return Job(endpoint="chat", method="POST", path="/v1/chat/completions", body=b"{}",
               payload=payload, headers={}, request_id="r")


def first(upstreams: list[Url], key: int) -> str:
    return balance.rank(upstreams, key, OPTIONS)[0].url


def test_adding_a_url_moves_only_the_keys_it_wins() -> None:
    keys = [balance.digest(f"prompt {i}".encode()) for i in range(3000)]
    three, four = urls(3), urls(4)
    before = [first(three, k) for k in keys]
    after = [first(four, k) for k in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == four[3].url for _, a in moved)  # only to the new URL
    assert 0.20 < len(moved) / len(keys) < 0.30  # about 1/4
    # and taking it away again puts every key back where it was
    assert [first(three, k) for k in keys] == before
    # the URLs' order in the list plays no part
    assert [first(list(reversed(three)), k) for k in keys] == before


def test_keys_spread_evenly_over_idle_urls_first_and_second() -> None:
    four = urls(4)
    firsts: dict[str, int] = {u.url: 0 for u in four}
    pairs: dict[tuple[str, str], int] = {}
    for i in range(12000):
        a, b, *_ = balance.rank(four, balance.digest(f"prompt {i}".encode()), OPTIONS)
        firsts[a.url] += 1
        pairs[a.url, b.url] = pairs.get((a.url, b.url), 0) + 1
    assert all(2700 < c < 3300 for c in firsts.values()), firsts
    # when its first URL fails, a key's requests spread evenly over the others
    assert len(pairs) == 12 and all(850 < c < 1150 for c in pairs.values()), pairs
    # the seeds' weights never tie, whatever the key
    assert len({balance.weight(0, u.seed) for u in four}) == 4


def test_bounded_loads_hold_in_a_skewed_workload() -> None:
    rng = random.Random(7)
    four = urls(4)
    keys = [balance.digest(f"system prompt {i}".encode()) for i in range(5)]
    weights = [60, 20, 10, 6, 4]  # most requests share one prefix
    for placed in range(1, 2001):
        key = rng.choices(keys, weights)[0]
        balance.rank(four, key, OPTIONS)[0].active += 1
        loads = [u.active for u in four]
        bound = -(-(1 + OPTIONS.epsilon) * placed // len(four))  # ceil((1 + eps) * mean)
        assert max(loads) <= max(bound, OPTIONS.min_bound), (placed, loads)
    mean = sum(u.active for u in four) / 4
    assert max(u.active for u in four) <= 1.25 * mean + 1


def test_a_busy_url_passes_its_keys_on_in_hash_order() -> None:
    three = urls(3)
    key = balance.digest(b"some prefix")
    order = [u.url for u in balance.rank(three, key, OPTIONS)]
    preferred = next(u for u in three if u.url == order[0])
    preferred.signals = Signals(readable=True, waiting=OPTIONS.max_waiting + 1)
    assert [u.url for u in balance.rank(three, key, OPTIONS)] == [order[1], order[0], order[2]]
    # a reported load above the bound does the same; an unreadable URL counts the proxy's own
    preferred.signals = Signals(readable=True, running=10)
    assert first(three, key) == order[1]
    preferred.signals = Signals(readable=True, running=OPTIONS.min_bound - 1)  # not yet a load
    assert first(three, key) == order[0]
    preferred.signals = Signals(readable=False, running=10)
    assert first(three, key) == order[0]
    preferred.active = 10
    assert first(three, key) == order[1]


def test_when_every_queue_is_full_the_least_loaded_takes_it() -> None:
    three = urls(3)
    for i, u in enumerate(three):
        u.signals = Signals(readable=True, waiting=OPTIONS.max_waiting + 10 - i)
    assert first(three, balance.digest(b"x")) == three[2].url


def test_every_turn_of_a_conversation_keys_alike_and_dict_order_does_not_matter() -> None:
    system = {"role": "system", "content": "You are terse."}
    turn1 = chat_job([system, {"role": "user", "content": "hello"}])
    turn2 = chat_job([system, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hi"},
                      {"content": "more", "role": "user"}])
    reordered = chat_job([{"content": "You are terse.", "role": "system"},
                          {"content": "hello", "role": "user"}])
    other = chat_job([system, {"role": "user", "content": "bye"}])
    keys = [balance.key(j, OPTIONS, session=False) for j in (turn1, turn2, reordered, other)]
    assert keys[0] == keys[1] == keys[2] != keys[3]


def test_a_long_shared_system_prompt_keys_alike_whatever_follows() -> None:
    system = {"role": "system", "content": "rules " * 1000}
    a = chat_job([system, {"role": "user", "content": "a"}])
    b = chat_job([system, {"role": "user", "content": "b"}])
    assert balance.key(a, OPTIONS, False) == balance.key(b, OPTIONS, False)
    assert len(balance.prefix(a.payload or {}, OPTIONS.prefix_bytes)) == OPTIONS.prefix_bytes


@pytest.mark.parametrize("prompt", ["a long prompt " * 400, ["a long prompt " * 400, "x"],
                                    list(range(5000))])
def test_completions_key_on_the_prompts_first_bytes(prompt: object) -> None:
    text = balance.prefix({"prompt": prompt}, 256)
    assert 0 < len(text) <= 256
    assert balance.prefix({"prompt": prompt, "max_tokens": 3}, 256) == text


def test_a_session_keys_by_header_then_user_then_prefix() -> None:
    job = chat_job([{"role": "user", "content": "q"}], user="alice")
    by_user = balance.key(job, OPTIONS, session=True)
    assert by_user == balance.key(chat_job([{"role": "user", "content": "other"}],
                                           user="alice"), OPTIONS, True)
    job.session = "conv-1"
    assert balance.key(job, OPTIONS, True) not in (by_user, balance.key(job, OPTIONS, False))
    anonymous = chat_job([{"role": "user", "content": "q"}])
    assert balance.key(anonymous, OPTIONS, True) == balance.key(anonymous, OPTIONS, False)


def test_a_vllm_metrics_page_is_read_for_its_load_only() -> None:
    page = b"\n".join([
        b"# TYPE vllm:num_requests_waiting gauge",
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0',
        b'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0',
        b'vllm:num_requests_waiting_by_reason{reason="x"} 99.0',
        b'vllm:num_requests_running{engine="0",model_name="m"} 7 1700000000000',
        b'vllm:gpu_cache_usage_perc{engine="0"} 0.5',
        b'vllm:kv_cache_usage_perc{engine="1"} 0.75',
        b'vllm:lora_requests_info{running_lora_adapters="sql,chat",waiting_lora_adapters="",'
        b'max_lora="2"} 1.0',
        b'vllm:lora_requests_info{running_lora_adapters="sql",waiting_lora_adapters="tone",'
        b'max_lora="2"} 2.0',
        b"vllm:num_requests_running{engine=\"1\"} NaN",
        b"vllm:num_requests_running{engine=\"2\"} -4",
        b"vllm:num_requests_running{broken",
        b"vllm:num_requests_running",
    ])
    load = read_vllm_metrics(page)
    assert (load.waiting, load.running, load.kv_cache) == (5.0, 7.0, 0.75)
    assert load.adapters == {"sql", "tone"}  # the newest info series
    with pytest.raises(ValueError):
        read_vllm_metrics(b"<html>not metrics</html>")
    assert read_vllm_metrics(b"vllm:num_requests_waiting 1e300\n").waiting == 1e9


def test_an_ollama_ps_answer_is_read_for_its_loaded_models() -> None:
    assert ollama_loaded({"models": [{"name": "llama3:8b", "model": "llama3:8b"}, 3]}) == {
        "llama3:8b"}
    with pytest.raises(ValueError):
        ollama_loaded({"error": "x"})
