"""Structured logs: one JSON object per line.

Records may carry ``extra={"fields": {...}}``; those fields are merged into
the object (the access log uses it for one line per request). Nothing here
adds request bodies: prompts and completions never reach the log.
"""

from __future__ import annotations

import logging
import time

import msgspec


def _ts(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
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


class JsonHandler(logging.StreamHandler):
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


def log_lines(logger: logging.Logger, message: str, rows: list[dict]) -> None:
    """One INFO line per row (its fields merged in, as ``extra={"fields": ...}`` does).

    When the gateway's JSON handler is the only one on the way (``gateway serve``),
    the lines are formatted here and written together, skipping a LogRecord and a
    write per line; otherwise each goes through logging as usual."""
    if not rows or not logger.isEnabledFor(logging.INFO):
        return
    root = logging.getLogger()
    handlers = root.handlers
    fast = (logger.propagate and not logger.handlers and not logger.filters and len(handlers) == 1
            and isinstance(handlers[0], JsonHandler) and handlers[0].level <= logging.INFO
            and not handlers[0].filters and not root.filters)
    if not fast:
        for fields in rows:
            logger.info(message, extra={"fields": fields})
        return
    head = {"ts": _ts(time.time()), "level": "info", "logger": logger.name, "msg": message}
    handlers[0].write_lines([msgspec.json.encode({**head, **fields}) for fields in rows])


def setup(level: int = logging.INFO) -> None:
    handler = JsonHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    # uvicorn's own loggers keep their handlers otherwise; route them through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
