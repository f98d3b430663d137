"""Spend reports and the caller's own key: ``GET /v1/keys/{name}/spend``,
``GET /v1/spend`` (admin) and ``GET /v1/key`` (any gateway key).

Reports read the spend ledger (``gateway/control/ledger.py``) over a range
of UTC days, grouped by day, model and (over all keys) key. JSON by default,
CSV with ``Accept: text/csv``. Costs leave as USD numbers, summed exactly in
the ledger's 1e-10 USD units first.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import re
from collections.abc import Mapping
from typing import Any, cast

import msgspec
from litestar import Request, Response, get
from litestar.params import FromPath
from msgspec import UNSET, UnsetType

from gateway.control.ledger import LedgerError, SpendRow, usd, usd_text
from gateway.errors import GatewayError
from gateway.limits.keys import GatewayKey
from gateway.state import Gateway

log = logging.getLogger("gateway.admin")

HTTPRequest = Request[Any, Any, Any]
HTTPResponse = Response[bytes]

#: The longest range a report covers, in days.
MAX_DAYS = 366
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: Columns a report can group by, in the order they are written.
_COLUMNS = ("key", "day", "model")


class Totals(msgspec.Struct):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


class SpendLine(msgspec.Struct, kw_only=True):
    """One row of a report; the columns not grouped by are left out."""

    key: str | UnsetType = UNSET
    date: str | UnsetType = UNSET
    model: str | UnsetType = UNSET
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


class SpendReport(msgspec.Struct):
    data: list[SpendLine]
    total: Totals
    from_: str = msgspec.field(name="from")
    to: str = ""
    group_by: str = "day"


class KeyUsage(msgspec.Struct):
    today: Totals
    month: Totals


class Remaining(msgspec.Struct):
    day: float | None
    month: float | None


class KeyInfo(msgspec.Struct):
    """``GET /v1/key``: the caller's key, its limits, what it used and what it has left."""

    name: str
    source: str
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    models: list[str] | None
    expires_at: str | None
    usage: KeyUsage
    remaining: Remaining


class _Sum:
    """Requests, tokens and cost (in ledger units) added up."""

    __slots__ = ("completion_tokens", "cost", "prompt_tokens", "requests")

    def __init__(self) -> None:
        self.requests = self.prompt_tokens = self.completion_tokens = self.cost = 0

    def add(self, row: SpendRow) -> None:
        self.requests += row.requests
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.cost += row.cost

    def totals(self) -> Totals:
        return Totals(self.requests, self.prompt_tokens, self.completion_tokens, usd(self.cost))


def _gateway(request: HTTPRequest) -> Gateway:
    return cast(Gateway, request.app.state.gateway)


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _date(params: Mapping[str, str], name: str) -> dt.date | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        if not _DATE.match(value):
            raise ValueError(value)
        return dt.date.fromisoformat(value)
    except ValueError:
        raise GatewayError(400, f"{name} must be a date as YYYY-MM-DD", code="invalid_date", param=name) from None


def report_range(params: Mapping[str, str], today: dt.date) -> tuple[dt.date, dt.date]:
    """``from`` and ``to`` (UTC days, both included): by default from the
    first day of ``to``'s month (this month's) to today."""
    last = _date(params, "to") or today
    first = _date(params, "from") or last.replace(day=1)
    if first > last:
        raise GatewayError(400, "from is after to", code="invalid_date_range", param="from")
    if (last - first).days + 1 > MAX_DAYS:
        raise GatewayError(400, f"a report covers at most {MAX_DAYS} days", code="invalid_date_range", param="from")
    return first, last


def grouping(value: str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The columns of ``group_by`` (default ``day``), in report order."""
    names = ["day"] if value is None else [n.strip() for n in value.split(",")]
    if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
        choices = ", ".join(allowed)
        raise GatewayError(
            400,
            f"group_by must be a comma-separated list of {choices} (each once)",
            code="invalid_group_by",
            param="group_by",
        )
    return tuple(c for c in _COLUMNS if c in names)


def group_rows(rows: list[SpendRow], group: tuple[str, ...]) -> tuple[list[tuple[tuple[str, ...], _Sum]], _Sum]:
    """Rows added up per group (sorted by key, day, model: the group's
    values, in ``group``'s order), and the total."""
    groups: dict[tuple[str, ...], _Sum] = {}
    total = _Sum()
    for row in rows:
        values = {"key": row.key, "day": row.day.isoformat(), "model": row.model}
        label = tuple(values[c] for c in group)
        found = groups.get(label)
        if found is None:
            found = groups[label] = _Sum()
        found.add(row)
        total.add(row)
    return sorted(groups.items()), total


def _line(group: tuple[str, ...], label: tuple[str, ...], summed: _Sum) -> SpendLine:
    cols = dict(zip(group, label, strict=True))
    return SpendLine(
        key=cols.get("key", UNSET),
        date=cols.get("day", UNSET),
        model=cols.get("model", UNSET),
        requests=summed.requests,
        prompt_tokens=summed.prompt_tokens,
        completion_tokens=summed.completion_tokens,
        cost=usd(summed.cost),
    )


#: A cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    """A key name or model id as a spreadsheet shows it, never run as a formula:
    names come from config files and admin requests, and reports get opened in Excel."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv(rows: list[SpendRow], group: tuple[str, ...]) -> bytes:
    """The report as CSV, one header row; costs written exactly (decimal USD)."""
    groups, _ = group_rows(rows, group)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [*("date" if c == "day" else c for c in group), "requests", "prompt_tokens", "completion_tokens", "cost"]
    )
    for label, summed in groups:
        writer.writerow(
            [*map(_cell, label), summed.requests, summed.prompt_tokens, summed.completion_tokens, usd_text(summed.cost)]
        )
    return out.getvalue().encode()


async def _rows(gw: Gateway, key: str | None, first: dt.date, last: dt.date) -> list[SpendRow]:
    try:
        return await gw.ledger.rows(key, first, last)
    except LedgerError as exc:
        log.warning("spend report failed: %s", exc)
        raise GatewayError(503, "the spend ledger cannot be read right now", code="ledger_unavailable") from None


async def _report(request: HTTPRequest, key: str | None, allowed: tuple[str, ...]) -> HTTPResponse:
    gw = _gateway(request)
    params = request.query_params
    first, last = report_range(params, _today())
    group = grouping(params.get("group_by"), allowed)
    rows = await _rows(gw, key, first, last)
    if "text/csv" in request.headers.get("accept", ""):
        name = f"spend-{key or 'all'}-{first.isoformat()}-{last.isoformat()}.csv"
        disposition = {"content-disposition": f'attachment; filename="{name}"'}
        return Response(_csv(rows, group), media_type="text/csv; charset=utf-8", headers=disposition)
    groups, total = group_rows(rows, group)
    lines = [_line(group, label, summed) for label, summed in groups]
    report = SpendReport(lines, total.totals(), first.isoformat(), last.isoformat(), ",".join(group))
    return Response(msgspec.json.encode(report), media_type="application/json")


def _require_admin(request: HTTPRequest) -> None:
    _gateway(request).admin.require(request.method, request.headers, request.cookies)


@get("/v1/keys/{name:str}/spend", summary="A key's spend per day and/or model (admin)")
async def key_spend(request: HTTPRequest, name: FromPath[str]) -> HTTPResponse:
    _require_admin(request)
    gw = _gateway(request)
    if all(k.name != name for k in gw.keys.listed()):
        raise GatewayError(404, f"no key named {name!r}", code="key_not_found", param="name")
    return await _report(request, name, ("day", "model"))


@get("/v1/spend", summary="Spend over all keys per day, model and/or key (admin)")
async def all_spend(request: HTTPRequest) -> HTTPResponse:
    _require_admin(request)
    return await _report(request, None, _COLUMNS)


def _rfc3339(unix: float | None) -> str | None:
    if unix is None:
        return None
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _left(budget: float | None, spent: Totals) -> float | None:
    return None if budget is None else round(max(budget - spent.cost, 0.0), 10)


def key_info(key: GatewayKey, rows: list[SpendRow], today: dt.date) -> KeyInfo:
    """The key, and its usage today and this month from ``rows`` (this month's)."""
    day, month = _Sum(), _Sum()
    for row in rows:
        if row.day.year == today.year and row.day.month == today.month:
            month.add(row)
            if row.day == today:
                day.add(row)
    quota = key.quota
    usage = KeyUsage(today=day.totals(), month=month.totals())
    return KeyInfo(
        name=key.name,
        source=key.source,
        rpm=quota.rpm,
        tpm=quota.tpm,
        max_concurrent=quota.max_concurrent,
        budget_usd_per_day=quota.budget_usd_per_day,
        budget_usd_per_month=quota.budget_usd_per_month,
        models=None if key.models is None else sorted(key.models),
        expires_at=_rfc3339(key.expires_at),
        usage=usage,
        remaining=Remaining(
            _left(quota.budget_usd_per_day, usage.today), _left(quota.budget_usd_per_month, usage.month)
        ),
    )


@get("/v1/key", summary="The calling key: its limits, usage today and this month, and budget left")
async def current_key(request: HTTPRequest) -> HTTPResponse:
    gw = _gateway(request)
    key = gw.keys.authenticate(request.headers.get("authorization"))
    today = _today()
    rows = await _rows(gw, key.name, today.replace(day=1), today)
    return Response(msgspec.json.encode({"data": key_info(key, rows, today)}), media_type="application/json")


#: The routes of this module, for ``routes.create_app``.
SPEND_ROUTES = [key_spend, all_spend, current_key]
