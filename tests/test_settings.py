"""Settings: TOML + environment, interpolation, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from processor import registry
from processor.errors import ConfigError
from processor.settings import Settings, explain


def load(tmp_path: Path, text: str, **env: str) -> Settings:
    path = tmp_path / "ftjobs.toml"
    path.write_text(text)
    return Settings.load(path, env)


def test_defaults_without_a_file() -> None:
    settings = Settings.load(None, {})
    assert settings.receiver.port == 8080 and settings.receiver.path == "/webhooks/openai"
    assert settings.receiver.verify_signatures is True and settings.receiver.tolerance_s == 300
    assert settings.receiver.max_body_bytes == 256 * 1024
    assert settings.receiver.dedupe_window_s >= 72 * 3600
    assert settings.redis.url == "" and settings.redis.retention_s == 7 * 24 * 3600
    assert [(h.name, h.type) for h in settings.handlers] == [("log", "log")]


def test_environment_overrides(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        '[redis]\nurl = "redis://file:6379"\n[receiver]\nsecrets = ["whsec_ZmlsZQ=="]\n',
        REDIS_URL="redis://env:6379/2",
        OPENAI_WEBHOOK_SECRET="whsec_bmV3, whsec_b2xk",
    )
    assert settings.redis.url == "redis://env:6379/2"
    assert settings.receiver.secrets == ["whsec_bmV3", "whsec_b2xk"]


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[receiver]\nport = 9001\n")
    assert Settings.load(None, {"FTJOBS_CONFIG": str(path)}).receiver.port == 9001


def test_interpolation(tmp_path: Path) -> None:
    text = """
[receiver]
secrets = ["${SECRET}"]
path = "${HOOK_PATH:-/hooks/ft}"
[[handlers]]
name = "log-${TEAM:-ml}"
type = "log"
"""
    settings = load(tmp_path, text, SECRET="whsec_abc", HOOK_PATH="")
    assert settings.receiver.secrets == ["whsec_abc"]
    assert settings.receiver.path == "/hooks/ft"  # `:-` replaces empty values too, as in the shell
    assert settings.handlers[0].name == "log-ml"


def test_missing_variable_names_key_and_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"receiver\.secrets\[0\]: environment variable NOPE is not set"):
        load(tmp_path, '[receiver]\nsecrets = ["${NOPE}"]\n')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[receiver]\nprot = 1\n", "receiver: Object contains unknown field `prot`"),
        ("[receiver]\nport = 'eighty'\n", "receiver.port: Expected `int`, got `str`"),
        ("[radis]\n", "Object contains unknown field `radis`"),
        (
            '[[handlers]]\nname = "a"\ntype = "log"\n[[handlers]]\nname = "b"\ntype = "log"\nwhen = { status = 3 }\n',
            "handlers[1].when.status: Expected `str | array`, got `int`",
        ),
        (
            '[[handlers]]\nname = "a"\ntype = "log"\nwhen = { stauts = ["failed"] }\n',
            "handlers[0].when: Object contains unknown field `stauts`",
        ),
        ('[[handlers]]\nname = "a"\ntype = "log"\n[[handlers]]\nname = "a"\ntype = "log"\n', "names must be unique"),
        ('[[handlers]]\ntype = "log"\n', "handlers[0]: Object missing required field `name`"),
        ("[receiver]\ndedupe_window_s = 60\n", "receiver.dedupe_window_s"),
        ("[receiver]\nport = 99999\n", "receiver.port: Expected `int` <= 65535"),
        ("[redis]\nretention_s = 3600\n", "redis.retention_s: must be at least receiver.dedupe_window_s"),
        ("[receiver]\ntolerance_s = 0\n", "receiver.tolerance_s: Expected `int` >= 1"),
        ("[receiver]\nenqueue_timeout_s = 0\n", "receiver.enqueue_timeout_s: Expected `float` > 0.0"),
        ("[worker]\nlease_s = -1\n", "worker.lease_s: Expected `float` > 0.0"),
        ('[[handlers]]\nname = "a"\ntype = "log"\ntimeout_s = 0\n', "handlers[0].timeout_s: Expected `float` > 0.0"),
        ("[openai]\npoll_interval_s = 60\n", "openai.poll_interval_s: polling needs an API key"),
        ("[receiver]\nidle_timeout_s = 0\n", "receiver.idle_timeout_s: Expected `float` > 0.0"),
        ("[receiver]\nport = 9000\nmetrics_port = 9000\n", "receiver.metrics_port: must differ"),
        ("not toml = = 1", "is not valid TOML"),
    ],
)
def test_errors_name_the_path(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)


def test_handler_options_are_validated_by_the_handler_type(tmp_path: Path) -> None:
    settings = load(tmp_path, '[[handlers]]\nname = "a"\ntype = "log"\nverbose = true\n')
    with pytest.raises(ConfigError, match=r"handlers\[0\]: Object contains unknown field `verbose`"):
        registry.build(settings.handlers)


def test_unknown_handler_type_lists_the_known_ones(tmp_path: Path) -> None:
    settings = load(tmp_path, '[[handlers]]\nname = "a"\ntype = "slak"\n')
    with pytest.raises(ConfigError, match=r"unknown handler type 'slak' \(known: .*log"):
        registry.build(settings.handlers)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "nope.toml", {})


class _Pinned(msgspec.Struct):
    a: dict[int, list[int]]
    b: int = 0


@pytest.mark.parametrize(
    ("raw", "message", "explained"),
    [
        (
            b'{"a":{"1":[1,"x"]}}',
            "Expected `int`, got `str` - at `$.a[...][1]`",
            "a[...][1]: Expected `int`, got `str`",
        ),
        (b'{"a":{"k":[]}}', "Expected `int`, got `str` - at `key` in `$.a`", "a: a key: Expected `int`, got `str`"),
        (b"{}", "Object missing required field `a`", "Object missing required field `a`"),
        (b'{"a":{},"b":"1"}', "Expected `int`, got `str` - at `$.b`", "b: Expected `int`, got `str`"),
    ],
)
def test_the_msgspec_wording_explain_parses(raw: bytes, message: str, explained: str) -> None:
    """`explain` turns msgspec's `... - at `$.path`` into `path: ...`. This pins msgspec's wording: when a
    release changes it, this test fails here (and `explain` falls back to the whole message meanwhile)."""
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(raw, type=_Pinned)
    assert str(caught.value) == message
    assert explain(caught.value) == explained


def test_explain_falls_back_to_the_whole_message() -> None:
    """A message without the path pattern is shown whole (after the root, when there is one)."""
    exc = msgspec.ValidationError("something new - at somewhere")
    assert explain(exc) == "something new - at somewhere"
    assert explain(exc, "handlers[0]") == "handlers[0]: something new - at somewhere"
