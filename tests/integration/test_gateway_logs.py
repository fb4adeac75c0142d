"""GET /logs/ and /logs/gpu as MONAI Label answers them (the OHIF panel links to logs/?lines=100)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli import make_say
from tests.fixtures.gateway import GatewayStack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs") / "logs" / "labelgrid.log"


@pytest.fixture(scope="module")
def file_stack(tmp_path_factory: pytest.TempPathFactory, log_file: Path) -> Iterator[GatewayStack]:
    stack = GatewayStack(tmp_path_factory.mktemp("gw"), gateway_overrides={"log_file": log_file}).start()
    yield stack
    stack.stop()


def test_tail_of_the_stack_log_as_text(file_stack: GatewayStack, log_file: Path):
    say = make_say(log_file)  # what `labelgrid up` writes
    for number in range(500):
        say(f"line {number}", "inference")
    answer = httpx.get(f"{file_stack.url}/logs/", params={"lines": 5, "text": "true"})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    lines = answer.text.splitlines()
    assert [line.split("| ")[1] for line in lines] == [f"line {n}" for n in range(495, 500)]
    assert lines[0].split("|")[0].strip() == "inference"
    # html=false is text too; the default is 300 lines
    assert len(httpx.get(f"{file_stack.url}/logs/", params={"html": "false"}).text.splitlines()) == 300


def test_html_page_escapes_and_refreshes(file_stack: GatewayStack, log_file: Path):
    make_say(log_file)("<script>alert(1)</script>", "gateway")
    answer = httpx.get(f"{file_stack.url}/logs/", params={"lines": 100, "refresh": 1})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in answer.text
    assert "<script>alert(1)" not in answer.text
    assert "setInterval(refreshLog, 3000)" in answer.text  # at least 3 s, as MONAI Label
    assert "setInterval" not in httpx.get(f"{file_stack.url}/logs/", params={"lines": 100}).text


def test_lines_are_bounded_and_params_checked(file_stack: GatewayStack, log_file: Path):
    say = make_say(log_file)
    for number in range(10_050):
        say(f"bulk {number}")
    every = httpx.get(f"{file_stack.url}/logs/", params={"lines": 0, "text": "true"})
    assert len(every.text.splitlines()) == 10_000
    assert (
        len(httpx.get(f"{file_stack.url}/logs/", params={"lines": 10**9, "text": "true"}).text.splitlines()) == 10_000
    )
    assert httpx.get(f"{file_stack.url}/logs/", params={"lines": "x"}).status_code == 422
    assert httpx.get(f"{file_stack.url}/logs/", params={"refresh": -1}).status_code == 422
    # no parameter names a file: a path-like extra is ignored, the route is the fixed log
    other = httpx.get(f"{file_stack.url}/logs/", params={"lines": 1, "text": "true", "file": "/etc/passwd"})
    assert other.text.endswith("bulk 10049\n")
    assert "root:" not in other.text
    assert httpx.get(f"{file_stack.url}/logs/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_missing_log_file_is_404(tmp_path: Path):
    stack = GatewayStack(tmp_path, gateway_overrides={"log_file": tmp_path / "none.log"}).start()
    try:
        answer = httpx.get(f"{stack.url}/logs/", params={"text": "true"})
        assert answer.status_code == 404 and "Log File NOT Found" in answer.json()["detail"]
    finally:
        stack.stop()


def test_without_a_file_the_gateway_own_recent_log(gateway_url: str):
    logging.getLogger("labelgrid.gateway").warning("a record for the logs route")
    answer = httpx.get(f"{gateway_url}/logs/", params={"lines": 50, "text": "true"})
    assert answer.status_code == 200
    assert "a record for the logs route" in answer.text


def test_logs_need_a_token_with_auth_on(tmp_path: Path, log_file: Path):
    stack = GatewayStack(tmp_path, gateway_overrides={"log_file": log_file, "auth_tokens": ["s3cret"]}).start()
    try:
        assert httpx.get(f"{stack.url}/logs/").status_code == 401
        assert httpx.get(f"{stack.url}/logs/gpu").status_code == 401
        ok = httpx.get(f"{stack.url}/logs/", params={"text": "true"}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.text
    finally:
        stack.stop()


def test_make_say_rotates_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("gateway.cli.LOG_FILE_MAX_BYTES", 1000)
    path = tmp_path / "stack.log"
    say = make_say(path)
    for number in range(200):
        say(f"rotating {number}")
    assert path.stat().st_size < 1100
    assert (tmp_path / "stack.log.1").stat().st_size < 1100
    assert path.read_text().splitlines()[-1].endswith("rotating 199")
