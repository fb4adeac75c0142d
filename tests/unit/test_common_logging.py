"""configure_logging renders stdlib logging through structlog."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from services.common.logging import configure_logging


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_json_lines_carry_extra_fields(restore_root_logging, capsys: pytest.CaptureFixture[str]):
    configure_logging("info", "json")
    logging.getLogger("labelgrid.test").info("listening", extra={"port": 1234})
    logging.getLogger("labelgrid.test").debug("hidden")
    structlog.get_logger("labelgrid.test").warning("from structlog", thing="x")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line["event"] for line in lines] == ["listening", "from structlog"]
    assert lines[0]["port"] == 1234 and lines[0]["level"] == "info" and lines[0]["logger"] == "labelgrid.test"
    assert lines[1]["thing"] == "x"


def test_reconfiguring_replaces_the_handler(restore_root_logging, capsys: pytest.CaptureFixture[str]):
    configure_logging("INFO", "json")
    configure_logging("DEBUG", "console")
    logging.getLogger("labelgrid.test").debug("once", extra={"k": "v"})
    err = capsys.readouterr().err
    assert err.count("once") == 1 and "k=v" in err


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        configure_logging("INFO", "xml")
