"""model_backend.yaml: both spellings, interpolation, secret files, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

import proxy.config
from proxy.cli import main
from proxy.config import (
    ChainSection,
    CustomConfig,
    FxnConfig,
    OllamaConfig,
    VllmConfig,
    build_config,
    load_config,
)
from proxy.errors import ConfigError

SNAKE = """
backend_provider: fxn
url: http://127.0.0.1:9000
fxn_id: fxn-llama-3
api_key: k1
bearer_token: t1
model_name_alias: served-as-alias
timeouts: {first_byte: 30, connect: 2}
limits: {max_body_bytes: 65536}
"""
CAMEL = """
backendProvider: fxn
url: http://127.0.0.1:9000
fxnId: fxn-llama-3
apiKey: k1
bearerToken: t1
modelNameAlias: served-as-alias
timeouts: {firstByte: 30, connect: 2}
limits: {maxBodyBytes: 65536}
"""


def write(tmp_path: Path, text: str, name: str = "model_backend.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_both_spellings_load_to_the_same_model(tmp_path: Path) -> None:
    snake = load_config(write(tmp_path, SNAKE, "a.yaml"))
    camel = load_config(write(tmp_path, CAMEL, "b.yaml"))
    assert isinstance(snake, FxnConfig)
    assert snake == camel
    assert snake.upstream_name == "served-as-alias"  # the alias wins, as on the node
    assert snake.timeouts.first_byte == 30
    assert snake.api_key is not None and snake.api_key.get_secret_value() == "k1"


def test_provider_variants_and_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "backend_provider: ollama\nurl: http://h:11434/\n"))
    assert isinstance(config, OllamaConfig)
    assert config.url == "http://h:11434"
    assert config.server.port == 8080
    assert config.api_key_header_name == "Authorization"
    custom = load_config(write(tmp_path, "backend_provider: custom\nurl: https://h\n", "c.yaml"))
    assert isinstance(custom, CustomConfig) and custom.api_key_header_name == "x-api-key"
    engine = load_config(write(tmp_path, "backend_provider: vllm\nengine: {model: /m}\n", "v.yaml"))
    assert isinstance(engine, VllmConfig) and engine.engine and engine.engine.model == "/m"
    frontend = load_config(write(tmp_path, (
        "backend_provider: vllm\nengine: {model: /m, servedModelName: a, tool_call_parser: hermes,"
        " enable_auto_tool_choice: true, reasoning_parser: qwen3,"
        " chat_template: '{{ messages }}', args: {max-num-seqs: 4}}\n"), "f.yaml"))
    assert isinstance(frontend, VllmConfig) and frontend.engine is not None
    assert frontend.engine.served_model_name == ("a",)
    assert frontend.engine.args == {"max-num-seqs": 4}


def test_env_interpolation_and_secret_files(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("from-file\n")
    (tmp_path / "keys.txt").write_text("# rotation\nk-old\n\nk-new\n")
    text = """
backend_provider: custom
url: http://${UP_HOST}:${UP_PORT:-8000}
api_key_file: key.txt
model: {name: "${NAME:-public}"}
auth: {api_keys_file: keys.txt}
server: {host: "$${literal}"}
"""
    config = load_config(write(tmp_path, text), env={"UP_HOST": "10.0.0.5"})
    assert config.url == "http://10.0.0.5:8000"
    assert config.api_key is not None and config.api_key.get_secret_value() == "from-file"
    assert [k.get_secret_value() for k in config.auth.api_keys] == ["k-old", "k-new"]
    assert config.model.name == "public"
    assert config.server.host == "${literal}"


BAD = {
    "unknown provider with hint": (
        "backend_provider: olama\nurl: http://h\n",
        "backend_provider: unknown provider 'olama' (did you mean 'ollama'?)",
    ),
    "missing provider": ("url: http://h\n", "backend_provider: is required"),
    "missing url for custom": (
        "backend_provider: custom\n",
        "url: url is required for backend_provider custom",
    ),
    "missing url for ollama": (
        "backend_provider: ollama\n",
        "url: url is required for backend_provider ollama",
    ),
    "missing url for fxn": (
        "backend_provider: fxn\nfxn_id: m\n",
        "url: url is required for backend_provider fxn",
    ),
    "missing fxn_id": (
        "backend_provider: fxn\nurl: http://h\n",
        "fxn_id: is required for backend_provider fxn",
    ),
    "vllm with neither url nor engine": (
        "backend_provider: vllm\n",
        "backend_provider: backend_provider vllm needs url",
    ),
    "url with /v1": (
        "backend_provider: custom\nurl: http://h/v1\n",
        "url: give the base URL without /v1",
    ),
    "url without scheme": (
        "backend_provider: custom\nurl: localhost:8000\n",
        "url: must be an http:// or https:// URL",
    ),
    "unknown key with hint": (
        "backend_provider: mock\ntimeout: {connect: 1}\n",
        "timeout: unknown key; did you mean 'timeouts'?",
    ),
    "nested unknown key with hint": (
        "backend_provider: mock\ntimeouts: {conect: 1}\n",
        "timeouts.conect: unknown key; did you mean 'connect'?",
    ),
    "section key at top level": (
        "backend_provider: mock\nport: 9000\n",
        "port: unknown key; did you mean 'server.port'?",
    ),
    "wrong type": (
        "backend_provider: mock\ntimeouts: {idle: soon}\n",
        "timeouts.idle: must be seconds (a number) or a duration such as 30s, 5m, 1h",
    ),
    "out of range": (
        "backend_provider: mock\nserver: {port: 70000}\n",
        "server.port: Input should be less than or equal to 65535",
    ),
    "negative timeout": (
        "backend_provider: mock\ntimeouts: {total: -1}\n",
        "timeouts.total: Input should be greater than 0",
    ),
    "auto tool choice without a parser": (
        "backend_provider: vllm\nengine: {model: m, enable_auto_tool_choice: true}\n",
        "engine: enable_auto_tool_choice needs tool_call_parser",
    ),
    "chat template neither a file nor a template": (
        "backend_provider: vllm\nengine: {model: m, chat_template: /no/such.jinja}\n",
        "engine.chat_template: no such file '/no/such.jinja'",
    ),
    "a named engine key in args": (
        "backend_provider: vllm\nengine: {model: m, args: {reasoning-parser: x}}\n",
        "engine.args: reasoning-parser has its own key in engine:",
    ),
    "a vllm serve option the proxy owns": (
        "backend_provider: vllm\nengine: {model: m, args: {port: 8000}}\n",
        "engine.args: port: the proxy serves HTTP itself (server:)",
    ),
    "served_model_name empty": (
        "backend_provider: vllm\nengine: {model: m, served_model_name: ''}\n",
        "engine.served_model_name[0]: String should have at least 1 character",
    ),
    "section for another provider": (
        "backend_provider: custom\nurl: http://h\nengine: {model: m}\n",
        "engine: not used by backend_provider custom (only by vllm)",
    ),
    "both spellings given": (
        "backend_provider: mock\napi_key: a\napiKey: b\n",
        "api_key: given twice, as apiKey and api_key; keep one",
    ),
    "unset env var": (
        "backend_provider: custom\nurl: ${NOT_SET_ANYWHERE_42}\n",
        "url: environment variable NOT_SET_ANYWHERE_42 is not set",
    ),
    "bad env reference": (
        "backend_provider: custom\nurl: http://${1X}\n",
        "url: bad environment reference ${1X}",
    ),
    "unreadable secret file": (
        "backend_provider: mock\napi_key_file: /nonexistent/key\n",
        "api_key_file: cannot read /nonexistent/key: No such file",
    ),
    "secret and secret file": (
        "backend_provider: mock\napi_key: a\napi_key_file: k\n",
        "api_key_file: give either api_key or api_key_file, not both",
    ),
    "yaml syntax error": (
        "backend_provider: mock\nurl: [a\nx: 1\n",
        ":3:2: YAML syntax error: expected ',' or ']'",
    ),
    "duplicate key": (
        "backend_provider: mock\nbackend_provider: custom\n",
        ":2:1: YAML syntax error: key 'backend_provider' is given twice",
    ),
    "empty file": ("", "the file is empty; it needs at least backend_provider"),
    "not a mapping": ("- mock\n", "the top level must be a mapping of keys, not a list"),
    "colliding credentials": (
        "backend_provider: vllm\nurl: http://h\napi_key: a\nbearer_token: b\n",
        "api_key: api_key and bearer_token would both be sent as Authorization",
    ),
    "bad enum": (
        "backend_provider: mock\nauth: {mode: some}\n",
        "auth.mode: Input should be 'any' or 'all'",
    ),
    "bad plugin path": (
        "backend_provider: no_such_module_xyz:Adapter\n",
        "backend_provider: cannot import adapter no_such_module_xyz:Adapter",
    ),
    "models: a name served twice": (
        "models:\n  - {backend_provider: mock, model: {name: a}}\n"
        "  - {backend_provider: mock, model: {name: b, aliases: [a]}}\n",
        "models[1].model: 'a' is already served by models[0]",
    ),
    "models: an entry without a name": (
        "models:\n  - {backend_provider: mock, model: {name: a}}\n  - {backend_provider: mock}\n",
        "models[1].model.name: is required: the name clients ask for",
    ),
    "models: a per-model key at the top level": (
        "url: http://h\nmodels:\n  - {backend_provider: mock, model: {name: a}}\n",
        "url: url belongs in each entry of models:",
    ),
    "models: a proxy-wide section in an entry": (
        "models:\n  - {backend_provider: mock, model: {name: a}, auth: {mode: all}}\n",
        "models[0].auth: is set for the whole proxy, at the top level",
    ),
    "models: a typo in an entry": (
        "models:\n  - {backend_provider: custom, model: {name: a}, ulr: http://h}\n",
        "models[0].ulr: unknown key; did you mean 'url'?",
    ),
    "models: an entry without url": (
        "models:\n  - {backend_provider: custom, model: {name: a}}\n",
        "models[0].url: url is required for backend_provider custom",
    ),
    "models: an entry's plugin path": (
        "models:\n  - {backend_provider: 'no_such_module_xyz:A', model: {name: a}}\n",
        "models[0].backend_provider: cannot import adapter no_such_module_xyz:A",
    ),
    "models: empty": ("models: []\n", "models: models must list at least one model"),
    "url list: a bad one": (
        "backend_provider: custom\nurl: [http://a, ftp://b]\n",
        "url: [1] must be an http:// or https:// URL",
    ),
    "url list: twice the same": (
        "backend_provider: custom\nurl: [http://a, http://a/]\n",
        "url: names the same URL twice",
    ),
    "bad routing": (
        "backend_provider: custom\nurl: http://a\nrouting: random\n",
        "routing: Input should be 'round_robin', 'least_busy', 'prefix' or 'session'",
    ),
    "bad session header": (
        "backend_provider: vllm\nurl: [http://a, http://b]\nrouting: session\n"
        "balance: {session_header: 'X Session'}\n",
        "balance.session_header: must be an HTTP header name",
    ),
    "bad balance interval": (
        "backend_provider: vllm\nurl: [http://a, http://b]\nbalance: {interval: soon}\n",
        "balance.interval: must be seconds (a number) or a duration",
    ),
    "bad price": (
        "backend_provider: mock\nmodel: {pricing: {prompt: cheap}}\n",
        "model.pricing.prompt: must be a number (USD per token)",
    ),
    "bad deprecation date": (
        "backend_provider: mock\nmodel: {deprecation_date: soon}\n",
        "model.deprecation_date: Input should be a valid date",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_exits_2_with_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = BAD[case]
    path = write(tmp_path, text)
    for command in ("check", "serve"):
        assert main([command, "-c", str(path)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"{path}: ") or lines[0].startswith(f"{path}:"), err
        assert expected in lines[0], err
        assert "Traceback" not in err


def test_missing_file_and_default_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["check", "-c", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{tmp_path / 'nope.yaml'}: file not found; ") and "\n" not in err
    for hint in ("-c PATH", "$MODEL_BACKEND_CONFIG", "model_backend.yaml.example"):
        assert hint in err
    write(tmp_path, "backend_provider: mock\n", "env.yaml")
    monkeypatch.setenv("MODEL_BACKEND_CONFIG", str(tmp_path / "env.yaml"))
    assert main(["check"]) == 0
    assert "valid (mock)" in capsys.readouterr().out


def test_several_problems_are_each_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "backend_provider: custom\ntimeouts: {idle: x, bogus: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # field problems are all reported together; cross-field rules (url) once those are fixed
    assert len(info.value.problems) == 2
    assert all(line.startswith(f"{path}: ") for line in info.value.problems)


def test_check_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pk").write_text("0x" + "ab" * 32)
    path = write(
        tmp_path,
        "backend_provider: fxn\nurl: http://h\nfxn_id: m\napi_key: SEKRIT-1\n"
        "bearer_token: SEKRIT-2\nfxn: {private_key_file: pk}\n"
        "auth: {api_keys: [SEKRIT-3]}\n",
    )
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SEKRIT" not in out and "abab" not in out
    assert out.count("********") == 4


def test_unreadable_secret_file_permissions(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        secret = tmp_path / "dir-not-file"
        secret.mkdir()
    else:
        secret = tmp_path / "locked"
        secret.write_text("x")
        secret.chmod(0)
    path = write(tmp_path, f"backend_provider: mock\nbearer_token_file: {secret}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}: bearer_token_file: cannot read {secret}")


def test_check_shows_each_model_with_its_secrets_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "models:\n"
                 "  - {backend_provider: custom, url: http://h, api_key: sk-entry-secret,\n"
                 "     model: {name: a}}\n"
                 "  - {backend_provider: mock, model: {name: b}}\n")
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sk-entry-secret" not in out and "********" in out
    assert "valid (models)" in out
    assert "\nurl:" not in out  # per-model keys appear in the entries only
    assert out.count("backend_provider:") == 2


def test_ollama_keep_alive_is_settled_at_load(tmp_path: Path) -> None:
    """Ollama refuses a bare number in a string ("30") on every request; the config says
    seconds, or fails at load with one line."""
    base = "backend_provider: ollama\nurl: http://h:11434\nollama:\n  keep_alive: "
    for given, kept in (('"30"', 30), ("'-1'", -1), ('"1.5"', "1.5s"), ('"1h30m"', "1h30m"),
                        ("300", 300)):
        config = load_config(write(tmp_path, base + given + "\n"))
        assert isinstance(config, OllamaConfig) and config.ollama.keep_alive == kept, given
    path = write(tmp_path, base + '"5 minutes"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: ollama.keep_alive: '5 minutes' is not a duration: give seconds (300) or a "
        'duration such as "5m" or "1h30m" (negative keeps the model loaded)'
    ]


def test_retired_upstream_client_key_is_a_note_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``upstream_client`` chose between two HTTP clients; there is one now. A config that
    still names it (either spelling, top level or a ``models:`` entry) loads, with one line
    per place saying the key is no longer read."""
    plain = load_config(write(tmp_path, "backend_provider: custom\nurl: http://h\n"))
    with caplog.at_level("WARNING", logger="model_proxy"):
        named = write(tmp_path, "backend_provider: custom\nurl: http://h\n"
                                "upstreamClient: aiohttp\n", "n")
        assert load_config(named) == plain
        many = write(tmp_path, (
            "upstream_client: aiohttp\nmodels:\n"
            "  - {backend_provider: custom, url: 'http://a', model: {name: a}}\n"
            "  - {backend_provider: custom, url: 'http://b', model: {name: b},"
            " upstream_client: lean}\n"
        ), "m")
        assert len(load_config(many).entries) == 2
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [
        f"{named}: upstreamClient: no longer read: the proxy has one HTTP client for "
        "upstreams now; remove the key",
        f"{many}: upstream_client: no longer read: the proxy has one HTTP client for "
        "upstreams now; remove the key",
        f"{many}: models.1.upstream_client: no longer read: the proxy has one HTTP client "
        "for upstreams now; remove the key",
    ]


def test_validation_reads_no_files_and_no_environment(tmp_path: Path) -> None:
    """Validators are pure: the node's key file and an engine's chat template are read by the
    load step (which reports them with the rest), and the installed entry points are given to
    validation, not looked up inside it."""
    node = {"backend_provider": "mock",
            "node": {"key_file": str(tmp_path / "absent.json"),
                     "scheduler_address": "0x" + "ab" * 20}}
    assert build_config(node).node is not None  # nothing read
    path = write(tmp_path, yaml.safe_dump(node))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems[-1].startswith(f"{path}: node.key_file: cannot read key file")
    plugin = {"backend_provider": "acme", "url": "http://h"}
    assert build_config(plugin, entry_points={"acme": "acme.adapter:Acme"}).backend_provider == (
        "acme")
    with pytest.raises(ValidationError, match="unknown provider 'acme'"):
        build_config(plugin, entry_points={})


def test_config_modules_do_no_io() -> None:
    """Only the load step (and the YAML reader it uses) touches files, the environment or the
    installed packages' metadata; one function of the provider registry lists entry points."""
    package = Path(proxy.config.__file__).parent
    pure = sorted(p.name for p in package.glob("*.py") if p.name not in ("load.py",
                                                                        "yamlfile.py"))
    assert "sections.py" in pure and "providers.py" in pure
    for name in pure:
        text = (package / name).read_text()
        for call in ("open(", ".read_text(", ".is_file(", "os.environ", "getenv(",
                     "from_file("):
            assert call not in text, f"{name} calls {call}"
        if name == "providers.py":
            assert text.count("importlib.metadata.entry_points(") == 1
        else:
            assert "importlib.metadata" not in text, name


SECONDS_FIELDS = [
    ("server", "shutdown_grace"), ("server", "keepalive_timeout"), ("server", "body_timeout"),
    ("timeouts", "connect"), ("timeouts", "first_byte"), ("timeouts", "idle"),
    ("timeouts", "total"), ("retries", "backoff_initial"), ("retries", "backoff_max"),
    ("retries", "total"), ("retries", "retry_after_cap"), ("circuit", "cooldown"),
    ("limits", "queue_timeout"),
]


@pytest.mark.parametrize(("section", "key"), SECONDS_FIELDS,
                         ids=[f"{s}.{k}" for s, k in SECONDS_FIELDS])
@pytest.mark.parametrize(("given", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25),
    (45, 45.0), ("12.5", 12.5),
])
def test_every_seconds_field_takes_a_duration(
    section: str, key: str, given: object, seconds: float
) -> None:
    config = build_config({"backend_provider": "mock", section: {key: given}})
    assert getattr(getattr(config, section), key) == seconds


def test_durations_in_the_node_and_signature_sections() -> None:
    config = build_config({
        "backend_provider": "mock",
        "auth": {"fxn_signatures": {"allowed_addresses": ["0x" + "11" * 20], "window": "5m"}},
    })
    assert config.auth.fxn_signatures is not None
    assert config.auth.fxn_signatures.window == 300.0
    chain = ChainSection(rpc_url="http://127.0.0.1:1", router_address="0x" + "22" * 20,
                         refresh="2m", timeout="10s")
    assert (chain.refresh, chain.timeout) == (120.0, 10.0)


@pytest.mark.parametrize("given", ["30 sec", "5 minutes", "1d", "s", True])
def test_what_is_not_a_duration_says_what_is(given: object, tmp_path: Path) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({"backend_provider": "mock", "timeouts": {"connect": given}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: timeouts.connect: must be seconds (a number) or a duration such as 30s, 5m, "
        "1h or 1h30m (units: ms, s, m, h)"]


@pytest.mark.parametrize(("text", "line"), [
    ("model: llama3\n", "model: is a section of keys, not a single value: write "
                        "model: {name: llama3}"),
    ("timeouts: 5\n", "timeouts: is a section of keys, not a single value: write "
                      "timeouts: {connect: 5}"),
    ("retries: [3]\n", "retries: is a section of keys such as retries: {attempts: ...}, "
                       "not a list"),
    ("model:\n", "model: is a section of keys such as model: {name: ...}, not empty"),
])
def test_a_value_where_a_section_belongs_says_what_to_write(
    text: str, line: str, tmp_path: Path
) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text("backend_provider: mock\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: {line}"]
    assert "instance of" not in caught.value.problems[0]


def test_a_value_where_an_entrys_section_belongs_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text("models:\n  - {backend_provider: mock, model: m1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: models[0].model: is a section of keys, not a single value: write "
        "model: {name: m1}"]


def test_several_vllm_urls_default_to_prefix_routing_and_nothing_else_does() -> None:
    urls = ["http://a:8000", "http://b:8000"]
    assert build_config({"backend_provider": "vllm", "url": urls}).routing == "prefix"
    assert build_config({"backend_provider": "vllm", "url": urls[:1]}).routing == "round_robin"
    assert build_config({"backend_provider": "vllm", "url": urls[0]}).routing == "round_robin"
    assert build_config({"backend_provider": "custom", "url": urls}).routing == "round_robin"
    assert build_config({"backend_provider": "ollama", "url": urls}).routing == "round_robin"
    written = {"backend_provider": "vllm", "url": urls, "routing": "round_robin"}
    assert build_config(written).routing == "round_robin"
    several = build_config({"models": [
        {"backend_provider": "vllm", "url": urls, "model": {"name": "a"}},
        {"backend_provider": "vllm", "url": urls, "routing": "least_busy", "model": {"name": "b"}},
    ]})
    assert [entry.routing for entry in several.entries] == ["prefix", "least_busy"]
