"""Clearing runs and reconciliation items on SQLite and PostgreSQL: stored runs name their inputs, re-clearing a
day gives the same run, late taps land in the next run, fleets follow their history, issuer-file adjustments are
carried once, shift gaps are flagged once. Totals are checked against plain sums of the rows written here."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pytest
from sqlalchemy import MetaData, delete, func, select

from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import Base, ClearingRun, Operator, ReconItem, Tap
from clearing.reconcile import ISSUER_COLUMNS, write_issuer_file

OP = "op_c"
DAY = date(2026, 3, 5)
START = datetime(2026, 3, 4, 19, 0, tzinfo=UTC)  # 03:00 Asia/Shanghai on DAY
NEXT = START + timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Clearing Bus")
        for v in ("V1", "V2", "V3"):
            registry.add_vehicle(conn, code=v, operator=OP, plate=f"A-{v}")
        cr.add_fleet(conn, code="F_EAST", operator=OP, name="East depot")
        cr.add_fleet(conn, code="F_WEST", operator=OP, name="West depot")
        cr.assign_vehicle(conn, vehicle="V1", fleet="F_EAST", valid_from=date(2026, 1, 1))
        cr.assign_vehicle(conn, vehicle="V2", fleet="F_EAST", valid_from=date(2026, 1, 1))
        cr.assign_vehicle(conn, vehicle="V2", fleet="F_WEST", valid_from=DAY + timedelta(days=1))  # moves later
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))
    yield engine
    engine.dispose()


_seq: dict[str, int] = {}
_card = iter(range(1, 10**9))  # every rider's card a different one


def tap(device="VAL1", *, at, received=None, kind="purchase", amount=200, route="R1", vehicle="V1", driver="D1",
        shift_no=1, asn=None, ttc=0, seq=None) -> dict:
    seq = seq if seq is not None else _seq.setdefault(device, 0) + 1
    _seq[device] = max(_seq.get(device, 0), seq)
    return {"device_id": device, "device_seq": seq, "kind": kind, "occurred_at": at,
            "received_at": received or at + timedelta(minutes=2), "operator": OP, "route": route,
            "vehicle": vehicle, "driver": driver, "shift_no": shift_no,
            "card_asn": asn or f"{next(_card):020X}", "card_type": 1, "card_ttc": ttc or seq, "amount": amount,
            "balance_after": 1000, "terminal_id": "010000000001", "terminal_seq": 5000 + seq,
            "tac": f"{seq:08X}", "reason": ""}


def store(engine, rows):
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), rows)


def day_taps(day_start, n=30):
    out = [tap("VAL1", at=day_start + timedelta(hours=1), kind="shift_open", amount=0)]
    for i in range(n):
        dev, veh = ("VAL1", "V1") if i % 3 else ("VAL2", "V2")
        out.append(tap(dev, at=day_start + timedelta(hours=2, minutes=i), vehicle=veh, route=f"R{i % 4}",
                       driver=f"D{i % 2}", amount=100 + 10 * i))
    return out


def plain(rows, key, day_start):
    sums = {}
    for r in rows:
        if r["kind"] == "purchase" and day_start <= r["occurred_at"] < day_start + timedelta(days=1):
            sums[r[key]] = sums.get(r[key], 0) + r["amount"]
    return sums


def test_migrations_build_the_schema_the_models_describe(engine):
    reflected = MetaData()
    reflected.reflect(engine)
    for table in Base.metadata.sorted_tables:
        got = reflected.tables[table.name]
        assert set(got.columns.keys()) == set(table.columns.keys()), table.name
        for column in table.columns:
            assert got.columns[column.name].nullable == column.nullable, f"{table.name}.{column.name}"


def test_a_day_is_stored_with_its_rows_and_recleared_to_the_same_run(engine):
    _seq.clear()
    rows = day_taps(START)
    store(engine, rows)
    with engine.begin() as conn:
        run = cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(hours=1))
    gross = sum(plain(rows, "route", START).values())
    assert run.totals["day_gross"] == gross and run.totals["day_taps"] == 30
    assert run.totals["day_commission"] == (gross * 60 + 5000) // 10000
    assert dict(zip(run.table("route")["route"], run.table("route")["gross"], strict=True)) == \
        plain(rows, "route", START)
    fleets = run.table("fleet")
    assert dict(zip(fleets["fleet"], fleets["gross"], strict=True)) == {"F_EAST": gross}  # V2 moved only later
    with engine.begin() as conn:
        again = cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(days=3))
        stored = cr.get_run(conn, run.id)
        runs = conn.execute(select(func.count()).select_from(ClearingRun)).scalar_one()
    assert again.recleared and again.id == run.id and again.fingerprint == run.fingerprint
    pd.testing.assert_frame_equal(again.rows, run.rows)
    pd.testing.assert_frame_equal(stored.rows, run.rows)
    assert runs == 1


def test_late_taps_land_in_the_next_run_and_the_closed_day_does_not_change(engine):
    _seq.clear()
    store(engine, day_taps(START))
    with engine.begin() as conn:
        first = cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(hours=1))
    # A bus offline since yesterday uploads a day-old purchase in the afternoon of the next day.
    late = tap("VAL3", vehicle="V3", route="R7", at=START + timedelta(hours=10), received=NEXT + timedelta(hours=8),
               amount=450)
    today = day_taps(NEXT, n=6)
    store(engine, [late, *today])
    with engine.begin() as conn:
        recheck = cr.clear_day(conn, operator=OP, day=DAY)
        second = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=NEXT + timedelta(days=1, hours=1))
    assert recheck.fingerprint == first.fingerprint and recheck.totals == first.totals
    assert second.totals["late_taps"] == 1 and second.totals["late_gross"] == 450
    assert second.totals["day_gross"] == sum(plain(today, "route", NEXT).values())
    late_rows = second.table("route", "late")
    assert list(zip(late_rows["route"], late_rows["for_day"], late_rows["gross"])) == [("R7", DAY, 450)]
    # The next day V2 is in the West fleet
    fleets = second.table("fleet")
    assert set(fleets["fleet"]) == {"F_EAST", "F_WEST"}
    assert int(fleets["gross"].sum()) == second.totals["day_gross"]


def test_a_skipped_day_is_cleared_first_and_an_earlier_day_is_refused(engine):
    _seq.clear()
    store(engine, day_taps(START) + day_taps(NEXT + timedelta(days=1), n=4))
    with engine.begin() as conn:
        cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(hours=1))
        third = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=2), now=NEXT + timedelta(days=2, hours=1))
        days = list(conn.execute(select(ClearingRun.service_day).order_by(ClearingRun.service_day)).scalars())
        assert third.totals["day_taps"] == 4
        with pytest.raises(ValueError, match="before the last cleared day"):
            cr.clear_day(conn, operator=OP, day=DAY - timedelta(days=1))
    assert days == [DAY, DAY + timedelta(days=1), DAY + timedelta(days=2)]


def test_a_changed_closed_day_is_refused_on_reclear(engine):
    _seq.clear()
    store(engine, day_taps(START))
    with engine.begin() as conn:
        cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(hours=1))
        conn.execute(delete(Tap).where(Tap.device_seq == 5))
    with engine.begin() as conn, pytest.raises(cr.ClearingMismatch, match="closed day"):
        cr.clear_day(conn, operator=OP, day=DAY)


def test_issuer_file_items_adjusted_are_carried_once_into_the_next_run(engine):
    _seq.clear()
    rows = day_taps(START, n=5)
    store(engine, rows)
    purchases = [r for r in rows if r["kind"] == "purchase"]
    file = pd.DataFrame([{"card_asn": r["card_asn"], "card_ttc": r["card_ttc"], "amount": r["amount"],
                          "terminal_id": r["terminal_id"], "terminal_seq": r["terminal_seq"], "tac": r["tac"],
                          "occurred_at": r["occurred_at"]} for r in purchases], columns=list(ISSUER_COLUMNS))
    with engine.begin() as conn:  # the file against the day's own purchases: nothing
        items, new = cr.import_issuer_file(conn, operator=OP, day=DAY, source=write_issuer_file(file))
    assert items == [] and new == []
    file.loc[0, "amount"] += 30  # the issuer cleared 30 fen more on one
    file = file.drop(index=1)  # and never saw another
    with engine.begin() as conn:
        items, new = cr.import_issuer_file(conn, operator=OP, day=DAY, source=write_issuer_file(file))
        _, again = cr.import_issuer_file(conn, operator=OP, day=DAY, source=write_issuer_file(file))
    assert sorted(i.problem for i in items) == ["amount_differs", "missing_in_file"] and len(new) == 2
    assert again == []  # stored once
    with engine.begin() as conn:
        work = cr.items(conn, operator=OP, status="open").set_index("problem")
        cr.resolve_item(conn, item_id=int(work.loc["amount_differs", "id"]), status="adjusted", by="clerk1",
                        now=NEXT, note="issuer's figure")
        cr.resolve_item(conn, item_id=int(work.loc["missing_in_file", "id"]), status="disputed", by="clerk1")
        run = cr.clear_day(conn, operator=OP, day=DAY, now=NEXT + timedelta(hours=1))
        done = cr.items(conn, operator=OP).set_index("problem")
        with pytest.raises(ValueError, match="closed"):
            cr.resolve_item(conn, item_id=int(work.loc["amount_differs", "id"]), status="accepted", by="x")
        second = cr.clear_day(conn, operator=OP, day=DAY + timedelta(days=1), now=NEXT + timedelta(days=1, hours=1))
    assert run.totals["reconciliation_gross"] == 30
    assert run.totals["reconciliation_net"] == 30 - 0  # 0.18 fen of commission rounds to 0
    assert done.loc["amount_differs", "carried_run_id"] == run.id
    assert done.loc["amount_differs", "resolved_by"] == "clerk1"
    assert pd.isna(done.loc["missing_in_file", "carried_run_id"])
    assert second.totals["reconciliation_gross"] == 0  # carried once


def test_shift_gaps_are_flagged_once_and_need_an_amount_to_adjust(engine):
    _seq.clear()
    rows = [tap("VAL1", at=START + timedelta(hours=1), kind="shift_open", amount=0, seq=1)]
    rows += [tap("VAL1", at=START + timedelta(hours=1, minutes=i), seq=1 + i) for i in range(1, 6)]
    rows.append(tap("VAL1", at=START + timedelta(hours=3), kind="shift_close", amount=0, seq=7))
    del rows[3]  # device_seq 4 never arrived
    rows += [tap("VAL2", at=START + timedelta(hours=2), kind="shift_open", amount=0, seq=1, shift_no=3),
             tap("VAL2", at=START + timedelta(hours=2, minutes=1), seq=2, shift_no=3)]  # never closed
    store(engine, rows)
    with engine.begin() as conn:
        totals, new = cr.reconcile_shifts_day(conn, operator=OP, day=DAY)
        _, again = cr.reconcile_shifts_day(conn, operator=OP, day=DAY)
        work = cr.items(conn, operator=OP)
        gap = int(work[work["problem"] == "records_missing"]["id"].iloc[0])
        with pytest.raises(ValueError, match="give the adjustment"):
            cr.resolve_item(conn, item_id=gap, status="adjusted", by="clerk1")
        cr.resolve_item(conn, item_id=gap, status="accepted", by="clerk1", note="a cancelled grey record")
        count = conn.execute(select(func.count()).select_from(ReconItem)).scalar_one()
    assert len(totals) == 2 and again == [] and len(new) == 2 and count == 2
    assert sorted(zip(work["ref"], work["problem"])) == [("VAL1/1", "records_missing"), ("VAL2/3", "not_closed")]
    assert int(totals[totals["device_id"] == "VAL1"]["amount"].iloc[0]) == sum(
        r["amount"] for r in rows if r["device_id"] == "VAL1" and r["kind"] == "purchase")


def test_no_commission_rate_is_a_clear_error(engine):
    with engine.begin() as conn:
        registry.add_operator(conn, code="op_norate", name="No rate")
        with pytest.raises(LookupError, match="farebox registry set-commission"):
            cr.clear_day(conn, operator="op_norate", day=DAY, now=NEXT)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_clearing_revision_upgrades_from_the_previous_one_and_back(request, backend):
    from alembic import command

    from backoffice.db import alembic_config

    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_schema_url")
    engine = make_engine(url)
    cfg = alembic_config(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "2026_11_22_0003")
            # The operator table as it was at 0003 (registry.add_operator writes later revisions' tables too).
            conn.execute(Operator.__table__.insert().values(code=OP, name="Before clearing",
                                                            timezone="Asia/Shanghai", cutoff_hour=3))
        with engine.begin() as conn:  # this revision alone: other domains' revisions branch beside it
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "2026_11_22_0004")
        with engine.begin() as conn:
            cr.set_commission_rate(conn, operator=OP, rate_bp=50, valid_from=DAY)
        with engine.begin() as conn:  # runs claim taps since revision 0012 (tap.clearing_run_id), by block since 0027
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "2026_12_03_0027")
        with engine.begin() as conn:
            assert cr.clear_day(conn, operator=OP, day=DAY, now=NEXT).totals["day_taps"] == 0
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "2026_11_22_0003")
        reflected = MetaData()
        reflected.reflect(engine)
        assert "clearing_run" not in reflected.tables and "operator" in reflected.tables
    finally:
        engine.dispose()
