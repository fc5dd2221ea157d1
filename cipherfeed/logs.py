"""Service logs: the classic text line, or (``CIPHERFEED_LOG_FORMAT=json``) one JSON object per
line with ``ts``, ``level``, ``service``, ``logger``, ``msg`` and the record's structured fields
(``log.info("...", extra={"size": 7})`` gives ``"size": 7``), for collectors that parse logs.

Both formats pass every message through ``redact`` first: a private-key PEM block or a password
inside a URL is replaced before anything is written, whichever logger produced it. That is a net
under the rule, not the rule: secrets are never passed to a logger in the first place (a test scans
the logs of a whole mesh for every secret it holds).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from cipherfeed.config import log_format

# Attributes every LogRecord has (and uvicorn's ANSI-coloured copy of the message); anything else
# on a record came in through ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}
_PEM_PRIVATE = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.I)
_HANDLER_NAME = "cipherfeed.logs"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def redact(text: str) -> str:
    """``text`` without private-key PEM blocks and URL passwords."""
    text = _PEM_PRIVATE.sub("[redacted private key]", text)
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:[redacted]@", text)


def _plain(value: Any) -> Any:
    """A JSON-encodable form of a structured field (bytes as hex, anything else as its str)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return redact(value) if isinstance(value, str) else value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line and not key.startswith("_"):
                line[key] = _plain(value)
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(service: str, fmt: str | None = None, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Sends the root logger's records to ``stream`` (stderr) in ``fmt`` (``text`` or ``json``;
    default ``CIPHERFEED_LOG_FORMAT``), replacing the handler an earlier call installed. Handlers
    someone else added (a test's log capture) stay."""
    chosen = fmt or log_format()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service) if chosen == "json" else RedactingFormatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
