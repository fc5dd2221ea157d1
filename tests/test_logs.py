"""Service logs: JSON lines with the fixed fields and the record's structured fields; secrets
that reach a logger anyway are redacted in both formats."""

import io
import json
import logging

import pytest

from cipherfeed import logs
from cipherfeed.config import ConfigError

PEM = (
    "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBxq1f0LpO0QU8n8rX6cA3Jm9oQ5b2G8x9RdtIh5mZxE\n"
    "-----END PRIVATE KEY-----"
)


def logged(fmt: str, emit) -> str:
    out = io.StringIO()
    logs.configure("keyservice", fmt, stream=out)
    root = logging.getLogger()
    try:
        emit(logging.getLogger("cipherfeed.test"))
    finally:  # leave no handler behind (its stream would be pytest's, closed later)
        for handler in [h for h in root.handlers if h.get_name() == "cipherfeed.logs"]:
            root.removeHandler(handler)
    return out.getvalue()


def test_json_lines_carry_the_fixed_fields_and_the_structured_ones():
    text = logged("json", lambda log: log.info("checkpoint %d signed", 7, extra={"size": 7, "root": b"\x01\x02"}))
    (line,) = text.splitlines()
    record = json.loads(line)
    assert record["service"] == "keyservice" and record["level"] == "INFO" and record["logger"] == "cipherfeed.test"
    assert record["msg"] == "checkpoint 7 signed"
    assert record["size"] == 7 and record["root"] == "0102"  # bytes as hex
    assert record["ts"].endswith("+00:00") and "T" in record["ts"]


def test_an_exception_stays_inside_its_one_json_line():
    def emit(log):
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.exception("failed")

    (line,) = logged("json", emit).splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "ValueError: bad" in record["exc"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_private_keys_and_url_passwords_are_redacted_in_both_formats(fmt):
    text = logged(
        fmt,
        lambda log: log.warning(
            "connecting to postgresql://ledger:s3cr3tpass@db:5432/ledger with %s", PEM, extra={"dsn": "redis://u:pw9@h"}
        ),
    )
    assert "s3cr3tpass" not in text and "MC4CAQAw" not in text and "pw9" not in text
    assert "[redacted]" in text and "[redacted private key]" in text
    assert "postgresql://ledger:[redacted]@db:5432/ledger" in text


def test_an_unknown_log_format_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("CIPHERFEED_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="CIPHERFEED_LOG_FORMAT"):
        logs.configure("x")
