"""Structured logs: one JSON object per line.

Records may carry ``extra={"fields": {...}}``; those fields are merged into
the object (the access log uses it for one line per request). Nothing here
adds request bodies: prompts and completions never reach the log.
"""

from __future__ import annotations

import logging
import time
from typing import Any, TextIO

import msgspec


def _ts(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            out["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(out).decode()


class JsonHandler(logging.StreamHandler[TextIO]):
    """The gateway's own handler: ``write_lines`` lets a batch of lines leave in one write."""

    def write_lines(self, lines: list[bytes]) -> None:
        text = b"\n".join(lines).decode() + self.terminator
        self.acquire()
        try:
            self.stream.write(text)
            self.flush()
        except Exception:  # noqa: BLE001 - as logging does: a lost log line must not fail a request
            self.handleError(logging.makeLogRecord({"msg": "access log lines"}))
        finally:
            self.release()


def log_lines(logger: logging.Logger, message: str, rows: list[dict[str, Any]]) -> None:
    """One INFO line per row (its fields merged in, as ``extra={"fields": ...}`` does).

    When the gateway's JSON handler is the only one on the way (``gateway serve``),
    the lines are formatted here and written together, skipping a LogRecord and a
    write per line; otherwise each goes through logging as usual."""
    if not rows or not logger.isEnabledFor(logging.INFO):
        return
    root = logging.getLogger()
    handlers = root.handlers
    handler = handlers[0] if len(handlers) == 1 else None
    fast = (
        logger.propagate
        and not logger.handlers
        and not logger.filters
        and isinstance(handler, JsonHandler)
        and handler.level <= logging.INFO
        and not handler.filters
        and not root.filters
    )
    if not fast or not isinstance(handler, JsonHandler):
        for fields in rows:
            logger.info(message, extra={"fields": fields})
        return
    head = {"ts": _ts(time.time()), "level": "info", "logger": logger.name, "msg": message}
    handler.write_lines([msgspec.json.encode({**head, **fields}) for fields in rows])


def setup(level: int = logging.INFO) -> None:
    handler = JsonHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    # uvicorn's own loggers keep their handlers otherwise; route them through ours.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The gateway writes its own access log (gateway.access); uvicorn's would be
    # a second line per request, at some 50 us of a worker's CPU each.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers[:] = []
    uvicorn_access.propagate = False
