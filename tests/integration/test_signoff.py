"""A clerk's sign-off (backoffice.signoff) on SQLite and PostgreSQL: a day with no clearing run cannot be signed off;
a signed-off day is not cleared again, neither by the use case nor by `farebox settle`; a tap of that day arriving
late goes into the next day's run as a late tap, the signed-off run keeps its figures, and the books add up. Every
figure is checked with plain SQL over the tap and clearing_run tables."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import MetaData, text

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import Base, Tap
from backoffice.day_lock import DayLocked, check_open, signed_off
from backoffice.signoff import SignOffError, sign_off

OP = "op_sign"
DAY = date(2026, 3, 5)
START = datetime(2026, 3, 4, 19, 0, tzinfo=UTC)  # 03:00 Asia/Shanghai on DAY
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")


@pytest.fixture
def engine(url):
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Sign Bus")
        registry.add_vehicle(conn, code="V1", operator=OP, plate="A-V1")
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))
    yield engine
    engine.dispose()


def tap(seq: int, *, at: datetime, received: datetime, amount: int = 200) -> dict:
    return {"device_id": "VAL1", "device_seq": seq, "kind": "purchase", "occurred_at": at, "received_at": received,
            "operator": OP, "route": "R1", "vehicle": "V1", "driver": "D1", "shift_no": 1,
            "card_asn": f"{seq:020X}", "card_type": 1, "card_ttc": seq, "amount": amount, "balance_after": 1000,
            "terminal_id": "010000000001", "terminal_seq": 5000 + seq, "tac": f"{seq:08X}", "reason": ""}


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).one()


def test_the_revision_builds_the_table_the_module_describes(engine):
    reflected = MetaData()
    reflected.reflect(engine)
    table, got = Base.metadata.tables["settlement_signoff"], reflected.tables["settlement_signoff"]
    assert set(got.columns.keys()) == set(table.columns.keys())
    for column in table.columns:
        assert got.columns[column.name].nullable == column.nullable, column.name


def test_a_signed_off_day_is_locked_and_a_late_tap_goes_to_the_next_run(engine, tmp_path):
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), [
            tap(1, at=START + timedelta(hours=2), received=START + timedelta(hours=3)),
            tap(2, at=START + timedelta(hours=5), received=START + timedelta(hours=6), amount=150)])
    cleared_at = START + timedelta(days=1, hours=2)
    with engine.begin() as conn, pytest.raises(SignOffError, match="no clearing run yet"):
        sign_off(conn, operator=OP, day=DAY, by="clerk wang", now=cleared_at)
    with engine.begin() as conn:
        run = cr.clear_day(conn, operator=OP, day=DAY, now=cleared_at)
    with engine.begin() as conn, pytest.raises(SignOffError, match="reload the page"):
        sign_off(conn, operator=OP, day=DAY, by="clerk wang", now=cleared_at, run_id=run.id + 1)
    with engine.begin() as conn:
        done = sign_off(conn, operator=OP, day=DAY, by="clerk wang", now=cleared_at, run_id=run.id)
    assert (done.approved_by, done.run_id, done.day_gross) == ("clerk wang", run.id, 350)
    row = sql(engine, "SELECT approved_by, run_id, day_gross, payable_net FROM settlement_signoff WHERE operator = :o "
                      "AND service_day = :d", o=OP, d=DAY)
    assert tuple(row) == ("clerk wang", run.id, 350, run.totals["payable_net"])
    with engine.begin() as conn, pytest.raises(SignOffError, match="signed off already by clerk wang"):
        sign_off(conn, operator=OP, day=DAY, by="someone else", now=cleared_at)

    with engine.begin() as conn, pytest.raises(DayLocked, match="signed off by clerk wang.*next run"):
        cr.clear_day(conn, operator=OP, day=DAY, now=cleared_at + timedelta(hours=1))
    with engine.connect() as conn:
        with pytest.raises(DayLocked):
            check_open(conn, operator=OP, day=DAY)
        check_open(conn, operator=OP, day=DAY + timedelta(days=1))  # the next day is open
        assert signed_off(conn, operator=OP, day=DAY + timedelta(days=1)) is None

    # A tap of the signed-off day arrives late (a bus out of reach): the next day's run takes it as a late tap.
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), [
            tap(3, at=START + timedelta(hours=8), received=cleared_at + timedelta(hours=3), amount=300),
            tap(4, at=START + timedelta(days=1, hours=2), received=START + timedelta(days=1, hours=3))])
    with engine.begin() as conn:
        nxt = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=START + timedelta(days=2, hours=2))
    day_row = sql(engine, "SELECT day_taps, day_gross, late_taps, late_gross FROM clearing_run WHERE id = :i", i=run.id)
    assert tuple(day_row) == (2, 350, 0, 0)  # the signed-off run is as it was approved
    next_row = sql(engine, "SELECT day_taps, day_gross, late_taps, late_gross FROM clearing_run WHERE id = :i",
                   i=nxt.id)
    assert tuple(next_row) == (1, 200, 1, 300)
    assert sql(engine, "SELECT clearing_run_id FROM tap_claimed WHERE device_seq = 3")[0] == nxt.id
    books = sql(engine, "SELECT SUM(day_gross + late_gross), SUM(day_taps + late_taps) FROM clearing_run")
    stored = sql(engine, "SELECT SUM(amount), COUNT(*) FROM tap WHERE kind = 'purchase'")
    assert tuple(books) == tuple(stored) == (850, 4)

    # `farebox settle --day` on the signed-off day: refused with the reason, exit 2, nothing written.
    env = {**os.environ, "FAREBOX_DATABASE_URL": str(engine.url.render_as_string(hide_password=False)),
           "FAREBOX_VAR_DIR": str(tmp_path / "var")}
    env.pop("FAREBOX_CONFIG", None)
    out = subprocess.run([sys.executable, "-m", "farebox.cli", "settle", "--operator", OP, "--day", str(DAY),
                          "--out", str(tmp_path / "reports")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "signed off by clerk wang" in out.stderr and "locked" in out.stderr
    assert sql(engine, "SELECT COUNT(*) FROM clearing_run")[0] == 2


def test_the_taps_browser_says_where_each_tap_went(engine):
    """backoffice.taps_browser over the same story: a tap of a cleared day is "cleared", a tap that came after its
    day was cleared is "late" (in the next day's run), one of a day not cleared yet "waiting", a deny-listed card
    "refused"; filters and the free-text search select what plain SQL selects."""
    from backoffice.taps_browser import TapFilter, export, latest_day_with_data, search

    denied = {**tap(9, at=START + timedelta(hours=4), received=START + timedelta(hours=5), amount=0),
              "kind": "denied", "reason": "deny-listed", "card_asn": "ab" * 10}
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), [
            tap(1, at=START + timedelta(hours=2), received=START + timedelta(hours=3)), denied,
            tap(2, at=START + timedelta(hours=5), received=START + timedelta(hours=6), amount=150)])
        run = cr.clear_day(conn, operator=OP, day=DAY, now=START + timedelta(days=1, hours=2))
        conn.execute(Tap.__table__.insert(), [
            tap(3, at=START + timedelta(hours=8), received=START + timedelta(days=1, hours=5), amount=300),
            tap(4, at=START + timedelta(days=1, hours=2), received=START + timedelta(days=1, hours=3)),
            tap(5, at=START + timedelta(days=2, hours=2), received=START + timedelta(days=2, hours=3))])
        nxt = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=START + timedelta(days=2, hours=2))
    assert run.id != nxt.id
    three = TapFilter(OP, DAY, DAY + timedelta(days=2))
    with engine.connect() as conn:
        page = search(conn, three, tz="Asia/Shanghai", cutoff_hour=3, limit=2, offset=0)
        assert (page.total, page.fares, page.amount) == (6, 5, 200 + 150 + 300 + 200 + 200)
        assert [r["device_seq"] for r in page.rows] == [1, 9]  # oldest first, a page of two
        every = export(conn, three, tz="Asia/Shanghai", cutoff_hour=3).rows
        outcome = {r["device_seq"]: (r["outcome"], r["clearing_run_id"]) for r in every}
        assert outcome == {1: ("cleared", run.id), 2: ("cleared", run.id), 9: ("refused", run.id),
                           3: ("late", nxt.id), 4: ("cleared", nxt.id), 5: ("waiting", None)}
        for wanted in ("cleared", "late", "waiting", "refused"):
            only = search(conn, TapFilter(OP, DAY, DAY + timedelta(days=2), outcome=wanted), tz="Asia/Shanghai",
                          cutoff_hour=3, limit=50)
            assert sorted(r["device_seq"] for r in only.rows) == sorted(
                s for s, (o, _r) in outcome.items() if o == wanted), wanted
        assert [r["device_seq"] for r in search(conn, TapFilter(OP, DAY, DAY, q="deny-LISTED"), tz="Asia/Shanghai",
                                                cutoff_hour=3).rows] == [9]
        assert [r["device_seq"] for r in search(conn, TapFilter(OP, DAY, DAY, q="A-V1"), tz="Asia/Shanghai",
                                                cutoff_hour=3).rows] == [1, 9, 2, 3]  # the plate, from the registry
        assert search(conn, TapFilter(OP, DAY, DAY, q="50%_"), tz="Asia/Shanghai", cutoff_hour=3).total == 0
        assert latest_day_with_data(conn, operator=OP, tz="Asia/Shanghai", cutoff_hour=3,
                                    now=START + timedelta(days=9)) == DAY + timedelta(days=2)
        assert latest_day_with_data(conn, operator=OP, tz="Asia/Shanghai", cutoff_hour=3,
                                    now=START + timedelta(hours=1)) == DAY  # not a later day than now's
    stored = sql(engine, "SELECT COUNT(*), SUM(CASE WHEN kind = 'purchase' THEN amount ELSE 0 END) FROM tap")
    assert tuple(stored) == (6, 1050)
