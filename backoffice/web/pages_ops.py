"""Pages for operations: the validators of the fleet (state, last tap, backlog and how old that figure is, link
history with the gaps a bus was off the air), the deny list (versions, what each changed, which bus runs which),
and the alarms list with its acknowledge button.

Everything read here is computed elsewhere: backoffice.devices (fleet_status, link_history),
backoffice.denylist_publish (versions), backoffice.alarms (listing, refresh, acknowledge). Times are shown in the
operator's zone (the page's ``tz``); a page spanning several operators uses Asia/Shanghai.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, timedelta
from typing import Annotated
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Connection, select

from backoffice import alarms
from backoffice.denylist_publish import current_version, get_version, versions
from backoffice.devices import fleet_status, link_history
from backoffice.models import Card, Operator, Tap
from backoffice.web.auth import Principal, page_of
from backoffice.web.deps import Services, connection, scoped, services
from backoffice.web.pages import render
from backoffice.web.csrf import check_csrf, csrf_token
from blacklist.delta import diff
from clearing.service_day import DEFAULT_TZ

router = APIRouter(include_in_schema=False)
Ops = Annotated[Principal, Depends(page_of("clerk", "operations"))]
Conn = Annotated[Connection, Depends(connection)]
Svc = Annotated[Services, Depends(services)]

STATES = {"online": ("在线", "online"), "offline": ("离线", "offline"), "never": ("未上线", "never heard")}
HOW = {"goodbye": ("正常关机", "switched off"), "lost": ("链路中断", "link lost"), "": ("", "")}


def _operators(conn: Connection, who: Principal) -> list[tuple[str, str, str]]:
    """(code, name, timezone) of the operators this person may see."""
    query = select(Operator.code, Operator.name, Operator.timezone).order_by(Operator.code)
    if who.scope(None) is not None:
        query = query.where(Operator.code == who.scope(None))
    return [tuple(r) for r in conn.execute(query)]


def _zone(operators: list[tuple[str, str, str]], chosen: str | None) -> str:
    for code, _name, tz in operators:
        if code == chosen or len(operators) == 1:
            return tz or DEFAULT_TZ
    return DEFAULT_TZ


@dataclasses.dataclass(frozen=True)
class Stretch:
    """One stretch of a device's link on the day shown, clipped to that day: the page's row and bar."""

    online: bool
    since: datetime
    until: datetime | None  # None: still so
    how: str
    left: float  # percent of the day, for the bar
    width: float
    silent_since: datetime | None = None  # still connected as far as anyone knows, but nothing heard since then


def _day_stretches(periods, start: datetime, end: datetime, now: datetime, stale_after: timedelta) -> list[Stretch]:
    out = []
    span = (end - start).total_seconds()
    for p in periods:
        until = p.until
        silent = p.last_heard if until is None and p.online and p.last_heard and now - p.last_heard > stale_after \
            else None
        a, b = max(p.since, start), min(until or silent or max(now, p.since), end)
        if b <= a and not (until is None and start <= p.since < end):
            continue
        out.append(Stretch(p.online, p.since, until, p.how, round(100 * (a - start).total_seconds() / span, 2),
                           round(max(0.3, 100 * (b - a).total_seconds() / span), 2), silent))
    return out


def stored_last_tap(conn: Connection, device_id: str) -> datetime | None:
    """When the newest record the back office stored from this validator happened (its highest journal epoch and
    sequence: one look into the unique index, whatever the size of the tap table)."""
    t = Tap.__table__.c
    at = conn.execute(select(t.occurred_at).where(t.device_id == device_id)
                      .order_by(t.epoch.desc(), t.device_seq.desc()).limit(1)).scalar_one_or_none()
    return None if at is None else (at if at.tzinfo else at.replace(tzinfo=UTC))


@router.get("/devices")
def devices(
    *,
    request: Request,
    who: Ops,
    conn: Conn,
    svc: Svc,
    operator: Annotated[str | None, Query(max_length=32)] = None,
    state: Annotated[str | None, Query(pattern="^(online|offline|never)?$")] = None,
    stale: Annotated[str | None, Query(pattern="^(yes|no)?$")] = None,
    day: Annotated[date | None, Query()] = None,
) -> HTMLResponse:
    operator = scoped(who, operator or None)
    now = svc.clock()
    latest = current_version(conn)
    operators = _operators(conn, who)
    tz = _zone(operators, operator)
    everything = fleet_status(conn, operator, now, stale_after=svc.stale_after)
    rows = [r for r in everything
            if (not state or state == ("never" if r.online is None else "online" if r.online else "offline"))
            and (not stale or r.stale == (stale == "yes"))]
    # The day of the link history: asked for, else the local day the fleet was last heard on.
    heard = [r.last_seen for r in rows if r.last_seen is not None]
    zone = ZoneInfo(tz)
    if day is None:
        day = (max(heard) if heard else now).astimezone(zone).date()
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    end = start + timedelta(days=1)
    history = link_history(conn, [r.device_id for r in rows], since=start)
    stretches = {d: _day_stretches([p for p in periods if p.since < end], start, end, now, svc.stale_after)
                 for d, periods in history.items()}
    last_taps = {r.device_id: stored_last_tap(conn, r.device_id) for r in rows}
    return render(
        request, "devices.html", who, tz=tz, rows=rows, total=len(everything), now=now,
        stale_minutes=int(svc.stale_after.total_seconds() // 60), latest=latest, operators=operators,
        chosen={"operator": operator or "", "state": state or "", "stale": stale or ""}, day=day,
        previous_day=day - timedelta(days=1), next_day=day + timedelta(days=1), stretches=stretches,
        STATES=STATES, HOW=HOW, hours=range(0, 25, 3), last_taps=last_taps,
        query="".join(f"{k}={quote(v)}&" for k, v in (("operator", operator), ("state", state), ("stale", stale)) if v),
    )


# ------------------------------------------------------------------------------------------------ deny list
@router.get("/denylist")
def denylist(
    *,
    request: Request,
    who: Annotated[Principal, Depends(page_of("clerk", "operations", "operator_staff"))],
    conn: Conn,
    svc: Svc,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    against: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> HTMLResponse:
    """The latest version, the stored versions with what each changed, one version's added and removed cards
    (against the one before it, or ``against``), and which bus runs which version."""
    latest = current_version(conn)
    listed = versions(conn, 30)
    counts: dict[int, tuple[int, int] | None] = {}
    stored = {v for v, *_ in listed}
    for v, *_ in listed:  # added / removed against the version before (None when that one was pruned)
        counts[v] = _change(conn, v - 1, v, stored) if v > 1 else None
    detail = None
    chosen = version or (latest.version if latest else None)
    if chosen is not None:
        base = against if against is not None else chosen - 1
        new = get_version(conn, chosen)
        if new is None:
            raise HTTPException(404, f"deny-list version {chosen} is not stored (pruned, or never made)")
        old_list = None
        if base >= 1:
            old = get_version(conn, base)
            old_list = old.load() if old is not None else None
        if base < 1 or old_list is not None:
            if old_list is None:
                adds, removes = [bytes(a).hex() for a in new.load()], []
            else:
                d = diff(old_list, new.load())
                adds, removes = [bytes(a).hex() for a in d.adds], [bytes(r).hex() for r in d.removes]
            status = dict(conn.execute(select(Card.asn, Card.status).where(Card.asn.in_(adds + removes))).all()) \
                if len(adds) + len(removes) <= 2000 else {}
            detail = {"version": new, "base": base, "adds": adds[:500], "removes": removes[:500],
                      "n_adds": len(adds), "n_removes": len(removes), "status": status}
        else:
            detail = {"version": new, "base": base, "missing": True}
    fleet = fleet_status(conn, who.scope(None), svc.clock(), stale_after=svc.stale_after)
    on_version: dict[int | None, int] = {}
    for r in fleet:
        on_version[r.denylist_version] = on_version.get(r.denylist_version, 0) + 1
    return render(request, "denylist.html", who, latest=latest, listed=listed, counts=counts, detail=detail,
                  fleet=fleet, on_version=on_version, operators=_operators(conn, who), tz=DEFAULT_TZ)


def _change(conn: Connection, old_v: int, new_v: int, stored: set[int]) -> tuple[int, int] | None:
    if old_v not in stored:
        return None
    old, new = get_version(conn, old_v), get_version(conn, new_v)
    if old is None or new is None:
        return None
    d = diff(old.load(), new.load())
    return len(d.adds), len(d.removes)


# ------------------------------------------------------------------------------------------------ alarms
@router.get("/alarms")
def alarms_page(
    *,
    request: Request,
    who: Ops,
    svc: Svc,
    state: Annotated[str, Query(pattern="^(active|open|cleared|all)$")] = "active",
    kind: Annotated[str | None, Query(max_length=32)] = None,
    done: Annotated[str, Query(max_length=200)] = "",
    error: Annotated[str, Query(max_length=300)] = "",
) -> HTMLResponse:
    now = svc.clock()
    with svc.engine.begin() as conn:  # the back office's own conditions, checked as the page opens
        alarms.refresh(conn, now=now)
    with svc.engine.connect() as conn:
        items = alarms.listing(conn, operator=who.scope(None), state=state, kind=kind or None)
        operators = _operators(conn, who)
    return render(request, "alarms.html", who, items=items, state=state, kind=kind or "", KINDS=alarms.KINDS,
                  tz=_zone(operators, who.scope(None)), done=done, error=error, csrf=csrf_token(request),
                  may_ack=who.role in ("operations", "admin"))


@router.post("/alarms/{alarm_id}/ack")
async def alarm_ack(
    *,
    request: Request,
    alarm_id: int,
    who: Annotated[Principal, Depends(page_of("operations"))],
    svc: Svc,
) -> Response:
    from starlette.concurrency import run_in_threadpool

    form = dict(await request.form())
    check_csrf(request, str(form.get("csrf", "")))
    back = str(form.get("state", "active"))
    back = back if back in ("active", "open", "cleared", "all") else "active"

    def work() -> Response:
        try:
            with svc.engine.begin() as conn:
                alarms.acknowledge(conn, alarm_id=alarm_id, by=who.name, now=svc.clock(), operator=who.scope(None))
        except alarms.NotFound as e:
            raise HTTPException(404, str(e)) from None
        except alarms.AlarmError as e:
            return RedirectResponse(f"/alarms?state={back}&error={quote(str(e))}", status_code=303)
        return RedirectResponse(f"/alarms?state={back}&done={alarm_id}", status_code=303)

    return await run_in_threadpool(work)
