"""The e-ticket figures where people read them, on SQLite and PostgreSQL: `farebox settle --day` (subprocess)
prints the day's ticket uses and revenue in yuan beside the card fares and the day's total (cards + tickets), the
issuer's commission on cards only; over HTTP (the app as `farebox serve` builds it, a clerk's token) the day's
ticket CSVs come from the reports API and the settlement page lists them, an operator without tickets gets no
ticket links and a 404 for a ticket table, the taps browser's kind "ticket" shows the flagged use with its reason,
and the ticket report page's CSV answers an unknown table with 422. Figures against plain SQL."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest
from backoffice.tickets.uses import store_records
from backoffice.web.app import create_app
from backoffice.web.auth import Principal, TokenStore
from wire.records import RecordKind, TapRecord

ROOT = Path(__file__).resolve().parents[2]
OP, OTHER = "tkview", "notix"
DAY = date(2026, 11, 20)
LOCAL0 = datetime(2026, 11, 19, 19, 0, tzinfo=UTC)  # 03:00 in Shanghai: DAY's first moment
NOON = LOCAL0 + timedelta(hours=9)
AFTER = LOCAL0 + timedelta(days=1, hours=2)  # the next morning: the day has ended
CLERK, OTHER_CLERK = "tok-clerk", "tok-other"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        for op in (OP, OTHER):
            registry.add_operator(conn, code=op, name=f"Bus {op}", at=LOCAL0 - timedelta(days=30))
            cr.set_commission_rate(conn, operator=op, rate_bp=60, valid_from=date(2026, 1, 1))
        registry.add_route(conn, code="R1", operator=OP, name="Route 1", flat_fare=200,
                           at=LOCAL0 - timedelta(days=30))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=300,
                              by="clerk", now=LOCAL0 - timedelta(days=1))
    yield engine
    engine.dispose()


def _sell(engine, n: int) -> list[int]:
    with engine.begin() as conn:
        order = orders.create_order(conn, operator=OP, channel="web", phone="13800000000",
                                    items=[ItemRequest("ride", n)], who="rider", now=NOON)
        orders.mark_paid(conn, order, amount_fen=300 * n, payment_ref=f"pay-{order}", who="platform", now=NOON)
        return [t.ticket_id for t in orders.issue_tickets(conn, order, keys=published_test_keys(), who="shop",
                                                          now=NOON)]


def _use(engine, seq: int, ticket_id: int, vehicle: str, minutes: int):
    at = NOON + timedelta(minutes=minutes)
    record = TapRecord(device_id=f"VAL-{vehicle}", device_seq=seq, kind=RecordKind.TICKET_USE, occurred_at=at,
                       operator=OP, route="R1", vehicle=vehicle, driver="D1", shift_no=1, ticket_id=ticket_id,
                       ticket_use=1, presented="qr")
    with engine.begin() as conn:
        return store_records(conn, [record], now=at + timedelta(minutes=1))[0]


def _yuan(fen: int) -> str:
    return f"¥{fen // 100:,}.{fen % 100:02d}"


def test_settle_prints_ticket_figures_and_the_pages_serve_them(engine, tmp_path):
    tickets = _sell(engine, 3)
    _use(engine, 1, tickets[0], "V1", 10)
    _use(engine, 2, tickets[1], "V1", 20)
    flagged = _use(engine, 1, tickets[0], "V2", 30)  # the same single ride on another bus
    assert flagged.flag == "second_use"

    env = {**os.environ, "FAREBOX_DATABASE_URL": engine.url.render_as_string(hide_password=False),
           "FAREBOX_VAR_DIR": str(tmp_path / "var")}
    env.pop("FAREBOX_CONFIG", None)
    out = subprocess.run([sys.executable, "-m", "farebox.cli", "settle", "--operator", OP, "--day", str(DAY),
                          "--out", str(tmp_path / "reports")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr

    with engine.connect() as conn:
        uses, fen = conn.execute(text(
            "SELECT COUNT(*), SUM(t.price_fen) FROM ticket_use u JOIN ticket t ON t.ticket_id = u.ticket_id "
            "WHERE u.operator = :op AND u.revenue = :yes"), {"op": OP, "yes": True}).one()
        unused = conn.execute(text(  # a single ride never used: breakage at the end of its validity, this day
            "SELECT COALESCE(SUM(price_fen), 0) FROM ticket t WHERE operator = :op AND NOT EXISTS (SELECT 1 FROM "
            "ticket_use u WHERE u.ticket_id = t.ticket_id AND u.revenue = :yes)"), {"op": OP, "yes": True}).scalar()
        card = conn.execute(text("SELECT day_gross FROM clearing_run WHERE operator = :op"), {"op": OP}).scalar()
    uses, fen, unused, card = int(uses), int(fen), int(unused), int(card)
    assert (uses, fen, unused) == (2, 600, 300)
    line = next(x for x in out.stdout.splitlines() if "e-tickets" in x)
    assert f"{uses} use(s), revenue recognised {_yuan(fen + unused)}" in line
    assert f"day's total (card gross + e-tickets) {_yuan(card + fen + unused)}" in line
    assert "no issuer commission" in line

    store = TokenStore(tokens={CLERK: Principal("alice", "clerk", OP), OTHER_CLERK: Principal("bob", "clerk", OTHER)})
    app = create_app(engine, tokens=store, clock=lambda: AFTER + timedelta(hours=5), migrate=False)
    with TestClient(app) as client:
        def get(url: str, token: str = CLERK):
            return client.get(url, headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)

        r = get(f"/api/v1/operators/{OP}/reports/days/{DAY}/settlement?format=csv&table=tickets_by_vehicle")
        assert r.status_code == 200, r.text
        rows = list(csv.reader(io.StringIO(r.content.decode("utf-8-sig"))))
        assert {row[0]: int(row[1]) for row in rows[1:-1]} == {"V1": 2, "(无 none)": 0}  # the fraud use: nothing
        assert rows[-1][2] == f"{(fen + unused) // 100}.{(fen + unused) % 100:02d}"

        page = get(f"/settlement?operator={OP}&day={DAY}")
        assert page.status_code == 200 and "table=ticket_sales" in page.text and 'id="tickets"' in page.text

        other = get(f"/settlement?operator={OTHER}&day={DAY}", OTHER_CLERK)
        assert other.status_code == 200 and "table=ticket" not in other.text and 'id="tickets"' not in other.text
        assert get(f"/api/v1/operators/{OTHER}/reports/days/{DAY}/settlement?format=csv&table=ticket_sales",
                   OTHER_CLERK).status_code == 404

        taps = get(f"/taps?operator={OP}&first={DAY}&last={DAY}&kind=ticket&outcome=flagged")
        assert taps.status_code == 200 and str(tickets[0]) in taps.text and flagged.reason.split(":")[0] in taps.text
        assert get(f"/tickets/report.csv?operator={OP}&first={DAY}&last={DAY}&table=nope").status_code == 422
        assert get(f"/tickets/report?operator={OP}&first={DAY}&last={DAY - timedelta(days=1)}").status_code == 422
