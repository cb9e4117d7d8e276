"""Soak: mixed requests through a real ``model-proxy serve`` process; memory levels off.

The run itself is ``bench.soak`` (its docstring has the long, manual mode: a million requests
with allocation snapshots); this is its short form for ``.ci/run``. The proxy runs as its own
process (its resident memory is its own) in front of a fast fake upstream process, and the
mix has plain and streamed chat, embeddings, abandoned streams, client errors, upstream
errors and configuration reloads under load.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import MIX, growth, soak

TOTAL = 120_000
WARMUP = 40_000
#: Allowed growth of resident heap memory (RssAnon: VmRSS without the file-backed pages, which
#: the kernel drops and reads back as other processes need memory) between the end of the
#: warm-up and the end: the bound the long run (a million requests) meets too.
MARGIN_BYTES = 2_000_000


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_memory_levels_off_over_120000_mixed_requests(tmp_path: Path) -> None:
    report = soak(TOTAL, warmup=WARMUP, every=20_000, work=tmp_path, reload_every=30_000,
                  seconds=400)
    print(f"\n{report.table()}\noutcomes {report.outcomes}")
    assert report.requests == TOTAL, "the load ran out of time"
    assert report.unexpected == 0, report.outcomes
    assert set(report.outcomes) == {kind.__name__ for kind in MIX}
    assert report.reloads == 3
    assert 'model_proxy_config_reloads_total{result="ok"} 3.0' in report.metrics
    in_flight = [line for line in report.metrics.splitlines()
                 if line.startswith("model_proxy_in_flight_requests ")]
    assert in_flight == ["model_proxy_in_flight_requests 0.0"]
    assert report.growth_anon < MARGIN_BYTES, report.table()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_memory_diagnostics_answer_their_signals(tmp_path: Path) -> None:
    """MODEL_PROXY_TRACEMALLOC (snapshot on SIGUSR1) and MODEL_PROXY_MALLOC_TRIM (SIGUSR2)."""
    traced = soak(600, warmup=200, every=200, work=tmp_path, trace=True, seconds=60)
    assert traced.requests == 600 and traced.unexpected == 0, traced.outcomes
    snapshots = [s.snapshot for s in traced.samples]
    assert [p.name for p in snapshots if p is not None] == [
        f"snapshot-{n:04d}.tracemalloc" for n in range(4)]
    assert snapshots[1] is not None and snapshots[3] is not None
    assert growth(snapshots[1], snapshots[3], top=5)[0].startswith("traced memory ")
    # Python's allocator statistics are there only without tracing (it replaces the allocator).
    trimmed = soak(400, warmup=200, every=200, work=tmp_path, trim=True, seconds=60)
    assert all(s.rss_trimmed is not None and s.rss_trimmed > 0 for s in trimmed.samples)
    assert (tmp_path / "proxy.log").read_text().count("# arenas allocated current") == 3
