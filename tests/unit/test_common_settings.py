"""ServiceSettings from env vars and generated flags; flags win."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from services.common.settings import ServiceSettings, parse_settings


class ExampleSettings(ServiceSettings):
    port: int = 50051
    backend: Literal["local", "s3"] = "local"
    root: Path = Path("var/studies")
    s3_secure: bool = False
    ratio: float = 0.5
    index: str = ""
    optional_limit: int | None = None


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    import os

    for name in list(os.environ):
        if name.startswith("LABELGRID_"):
            monkeypatch.delenv(name)


def test_defaults():
    settings = parse_settings(ServiceSettings, [], "test")
    assert settings.host == "127.0.0.1"
    assert settings.port == 0
    assert settings.metrics_port == 0
    assert settings.log_format == "console"
    assert settings.grace_seconds == 10.0
    assert settings.max_message_bytes == 8 * 1024 * 1024
    assert settings.auth_tokens == []


def test_env_vars_are_read(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LABELGRID_PORT", "6000")
    monkeypatch.setenv("LABELGRID_S3_SECURE", "true")
    monkeypatch.setenv("LABELGRID_AUTH_TOKENS", "a, b")
    monkeypatch.setenv("LABELGRID_BACKEND", "s3")
    monkeypatch.setenv("LABELGRID_ROOT", "/data/studies")
    settings = parse_settings(ExampleSettings, [], "test")
    assert settings.port == 6000
    assert settings.s3_secure is True
    assert settings.auth_tokens == ["a", "b"]
    assert settings.backend == "s3"
    assert settings.root == Path("/data/studies")


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LABELGRID_PORT", "6000")
    monkeypatch.setenv("LABELGRID_S3_SECURE", "true")
    monkeypatch.setenv("LABELGRID_AUTH_TOKENS", "a,b")
    monkeypatch.setenv("LABELGRID_RATIO", "0.9")
    settings = parse_settings(
        ExampleSettings,
        [
            "--port",
            "7000",
            "--no-s3-secure",
            "--auth-tokens",
            "x,y,z",
            "--metrics-port",
            "-1",
            "--root",
            "/tmp/r",
            "--backend",
            "s3",
            "--log-format",
            "json",
            "--index",
            "sqlite:///x.db",
            "--optional-limit",
            "3",
        ],
        "test",
    )
    assert settings.port == 7000
    assert settings.s3_secure is False
    assert settings.auth_tokens == ["x", "y", "z"]
    assert settings.metrics_port == -1
    assert settings.root == Path("/tmp/r")
    assert settings.backend == "s3"
    assert settings.log_format == "json"
    assert settings.index == "sqlite:///x.db"
    assert settings.optional_limit == 3
    assert settings.ratio == 0.9  # not given as a flag: env var still applies


def test_bool_flag_turns_on():
    assert parse_settings(ExampleSettings, ["--s3-secure"], "test").s3_secure is True


@pytest.mark.parametrize("argv", [["--backend", "gcs"], ["--port", "eleven"], ["--log-format", "xml"], ["--nope", "1"]])
def test_bad_flags_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        parse_settings(ExampleSettings, argv, "test")
    assert caught.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_bad_env_var_exits_with_usage(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("LABELGRID_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit):
        parse_settings(ExampleSettings, [], "test")
    assert "log_format" in capsys.readouterr().err


def test_help_hides_secret_defaults(capsys: pytest.CaptureFixture[str]):
    class WithSecret(ServiceSettings):
        s3_secret_key: str = "minioadmin"

    with pytest.raises(SystemExit):
        parse_settings(WithSecret, ["--help"], "test")
    out = capsys.readouterr().out
    assert "--s3-secret-key" in out and "minioadmin" not in out
