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

from bench.soak import MIX, soak

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
