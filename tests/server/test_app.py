"""``create_app``: a config that fails while the app is built leaves nothing open behind it."""

from __future__ import annotations

import gc
import warnings

import pytest

from proxy.config import build_config
from proxy.errors import ConfigError
from proxy.server.app import create_app


async def test_a_failed_build_leaves_no_unclosed_session() -> None:
    config = build_config({"backend_provider": "no_such_module:Adapter",
                           "url": "http://127.0.0.1:9"})
    with pytest.raises(ConfigError, match="cannot import adapter"):
        create_app(config)
    # The session's finaliser warns only when it is collected: collect here, in this test,
    # and look at what it said (an unclosed session used to surface in a later test).
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in seen if "Unclosed" in str(w.message)] == []
