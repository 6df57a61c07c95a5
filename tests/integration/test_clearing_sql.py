"""A run's figures summed in the database (issue 12: GROUPING SETS on PostgreSQL, GROUP BY per dimension on
SQLite) equal an independent computation in pandas over the rows this test generated, and the auditor's plain SQL
(``farebox audit``), on a day with the awkward cases: late taps of two earlier days (one arriving after that day's
run), refused taps, free rides, four card types, a vehicle that changes fleet on the day, taps at exactly the
cut-offs, a tap received exactly at the run's moment. The hour chart and the free rides of the reports too."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from backoffice import audit_runs
from backoffice import clearing_runs as cr
from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.models import Tap
from backoffice.settle import settle
from clearing import commission as fee

OP = "op_sql"
TZ = "Asia/Shanghai"
DAY = date(2026, 3, 5)
START = datetime(2026, 3, 4, 19, 0, tzinfo=UTC)  # 03:00 Asia/Shanghai on DAY
END = START + timedelta(days=1)
RATE = 60
VEHICLES = [f"V{i}" for i in range(12)]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="SQL Bus")
        for v in VEHICLES:
            registry.add_vehicle(conn, code=v, operator=OP, plate=f"A-{v}")
        cr.add_fleet(conn, code="F_N", operator=OP, name="North")
        cr.add_fleet(conn, code="F_S", operator=OP, name="South")
        for i, v in enumerate(VEHICLES[:8]):  # V8..V11 in no fleet
            cr.assign_vehicle(conn, vehicle=v, fleet="F_N" if i % 2 else "F_S", valid_from=date(2026, 1, 1))
        cr.assign_vehicle(conn, vehicle="V0", fleet="F_N", valid_from=DAY)  # moves on the day itself
        cr.assign_vehicle(conn, vehicle="V1", fleet="F_S", valid_from=DAY + timedelta(days=1))  # moves later
        cr.set_commission_rate(conn, operator=OP, rate_bp=RATE, valid_from=date(2026, 1, 1))
    yield engine
    engine.dispose()


def generate(rng, n: int, first: datetime, span: timedelta, *, received_at=None, seq0: int) -> list[dict]:
    rows = []
    for i in range(n):
        at = first + timedelta(seconds=int(rng.integers(0, int(span.total_seconds()))))
        kind = "denied" if rng.random() < 0.08 else "purchase"
        card_type = int(rng.choice([1, 1, 2, 3, 4]))
        amount = 0 if kind == "denied" or card_type == 4 or rng.random() < 0.1 else int(rng.choice([100, 150, 200]))
        v = int(rng.integers(0, len(VEHICLES)))
        rows.append(tap(seq0 + i, at, received_at or at + timedelta(seconds=int(rng.integers(1, 900))), kind,
                        VEHICLES[v], f"R{v % 5}", f"D{int(rng.integers(0, 7))}", card_type, amount))
    return rows


def tap(seq, at, received, kind, vehicle, route, driver, card_type, amount) -> dict:
    return {"device_id": f"VAL-{vehicle}", "device_seq": seq, "kind": kind, "occurred_at": at,
            "received_at": received, "operator": OP, "route": route, "vehicle": vehicle, "driver": driver,
            "shift_no": 0, "card_asn": f"{seq:020X}", "card_type": card_type, "card_ttc": seq, "amount": amount,
            "balance_after": 1000, "terminal_id": "010000000001", "terminal_seq": seq, "tac": f"{seq:08X}",
            "reason": "refused" if kind != "purchase" else ""}


def fleet_on(vehicle: str, day: date) -> str:
    history = {v: [(date(2026, 1, 1), "F_N" if i % 2 else "F_S")] for i, v in enumerate(VEHICLES[:8])}
    history["V0"].append((DAY, "F_N"))
    history["V1"].append((DAY + timedelta(days=1), "F_S"))
    found = ""
    for since, code in history.get(vehicle, []):
        if since <= day:
            found = code
    return found


def service_day(at: datetime) -> date:
    return (at.astimezone(ZoneInfo(TZ)) - timedelta(hours=3)).date()


def expected_rows(taps: list[dict], as_of: datetime) -> pd.DataFrame:
    """Independently: of the taps stored since the last run, the purchases up to the day's end received before
    the run's moment, by section and key."""
    frame = pd.DataFrame(taps)
    frame = frame[(frame["kind"] == "purchase") & (frame["occurred_at"] < END) & (frame["received_at"] < as_of)]
    frame = frame.assign(for_day=[service_day(t) for t in frame["occurred_at"]])
    frame = frame.assign(section=np.where(frame["for_day"] == DAY, "day", "late"),
                         fleet=[fleet_on(v, d) for v, d in zip(frame["vehicle"], frame["for_day"], strict=True)],
                         card_type=frame["card_type"].astype(str), operator=OP)
    parts = []
    for dim in ("operator", "fleet", "route", "vehicle", "driver", "card_type"):
        g = frame.groupby(["section", "for_day", dim]).agg(taps=("amount", "size"), gross=("amount", "sum"))
        parts.append(g.reset_index().rename(columns={dim: "key"}).assign(dimension=dim))
    out = pd.concat(parts, ignore_index=True)
    return out[["section", "for_day", "dimension", "key", "taps", "gross"]].astype({"taps": "int64",
                                                                                    "gross": "int64"})


def test_sums_in_the_database_equal_pandas_and_the_auditor(engine, tmp_path):
    rng = np.random.default_rng(12)
    earlier = generate(rng, 300, START - timedelta(days=2), timedelta(days=2), seq0=1)  # two earlier days
    day_before_run = START + timedelta(hours=2)  # the run of DAY-1, made before some of its taps arrived
    on_time = [t for t in earlier if t["received_at"] < day_before_run]
    arriving = [t for t in earlier if t["received_at"] >= day_before_run]
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), on_time)
        cr.clear_day(conn, operator=OP, day=DAY - timedelta(days=2), now=START - timedelta(days=1) + timedelta(hours=1))
        cr.clear_day(conn, operator=OP, day=DAY - timedelta(days=1), now=day_before_run)
    as_of = END + timedelta(hours=1)
    today = generate(rng, 1500, START, timedelta(days=1), seq0=10_000)
    edges = [
        tap(20_001, START, START + timedelta(minutes=1), "purchase", "V0", "R0", "D0", 2, 150),  # exactly the cut-off
        tap(20_002, END, END + timedelta(minutes=1), "purchase", "V0", "R0", "D0", 1, 200),  # next day's
        tap(20_003, START + timedelta(hours=5), as_of, "purchase", "V3", "R3", "D3", 1, 200),  # received at as_of
        tap(20_004, END - timedelta(seconds=1), END, "purchase", "V11", "R1", "D9", 3, 0),  # free, last second
        tap(20_005, START - timedelta(seconds=1), START, "purchase", "V1", "R1", "D1", 1, 300),  # late by 1 s
        tap(20_006, START - timedelta(hours=30), START + timedelta(hours=3), "purchase", "V0", "R0", "D2", 2, 150),
    ]
    with engine.begin() as conn:
        conn.execute(Tap.__table__.insert(), arriving + today + edges)
    # Before the day is cleared: provisional figures, every stored purchase of the day, summed in SQL too.
    with engine.begin() as conn:
        early = settle(conn, operator=OP, day=DAY, now=as_of, close_day=False)
    stored = pd.DataFrame(earlier + arriving + today + edges)
    stored = stored[(stored["kind"] == "purchase") & (stored["occurred_at"] >= START) & (stored["occurred_at"] < END)]
    assert early.run is None and early.provisional
    for dim in ("route", "vehicle", "driver", "card_type"):
        want_dim = stored.groupby(dim).agg(taps=("amount", "size"), amount=("amount", "sum")).reset_index()
        got_dim = early.settlement.tables()[dim]
        assert got_dim[dim].tolist() == want_dim[dim].tolist(), dim
        assert got_dim[["taps", "amount"]].to_numpy().tolist() == want_dim[["taps", "amount"]].to_numpy().tolist()
    assert early.settlement.amount == int(stored["amount"].sum())
    with engine.begin() as conn:
        result = settle(conn, operator=OP, day=DAY, reports_dir=tmp_path, now=as_of)
    run = result.run
    assert run.fingerprint.startswith("2:")

    taps = arriving + today + edges  # what no run had taken before this one
    want = expected_rows(taps, as_of)
    got = run.rows[run.rows["section"].isin(["day", "late"])][list(want.columns)].copy()
    got["for_day"] = [d if isinstance(d, date) else date.fromisoformat(str(d)) for d in got["for_day"]]
    key = ["section", "for_day", "dimension", "key"]
    merged = want.merge(got, on=key, how="outer", suffixes=("_want", "_got"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].to_string()
    assert (merged["taps_want"] == merged["taps_got"]).all() and (merged["gross_want"] == merged["gross_got"]).all()
    assert {"late"} <= set(got["section"]) and len(set(got.loc[got["section"] == "late", "for_day"])) == 2
    assert set(got.loc[(got["dimension"] == "card_type"), "key"]) == {"1", "2", "3", "4"}
    assert set(got.loc[(got["dimension"] == "fleet") & (got["section"] == "day"), "key"]) == {"", "F_N", "F_S"}

    # Commission: the day's on its gross, shared out over every dimension's keys, net = gross - commission.
    day_rows = run.rows[run.rows["section"] == "day"]
    day_gross = int(want[(want["section"] == "day") & (want["dimension"] == "operator")]["gross"].sum())
    assert run.totals["day_gross"] == day_gross and run.totals["day_commission"] == fee.commission_of(day_gross, RATE)
    for dim, rows in day_rows.groupby("dimension"):
        assert int(rows["commission"].sum()) == run.totals["day_commission"], dim
    assert (run.rows["gross"] - run.rows["commission"] == run.rows["net"]).all()

    # The reports' hour chart and free rides, against the same rows.
    mine = pd.DataFrame(taps)
    mine = mine[(mine["kind"] == "purchase") & (mine["occurred_at"] >= START) & (mine["occurred_at"] < END)
                & (mine["received_at"] < as_of)]
    hours = [0] * 24
    for at in mine["occurred_at"]:
        hours[at.astimezone(ZoneInfo(TZ)).hour] += 1
    assert result.tables.taps_by_hour["taps"].tolist() == hours
    free = mine[mine["amount"] == 0].groupby("card_type").size().to_dict()
    cards = result.tables.by_card_type
    assert {int(c): int(f) for c, f in zip(cards["card_type"], cards["free"], strict=True) if f} == free

    # The auditor's plain SQL finds nothing to say, and clearing the day again gives the same run.
    with engine.connect() as conn:
        found = audit_runs.audit(conn, operator=OP)
    assert found.clean, found.differences
    with engine.begin() as conn:
        again = cr.clear_day(conn, operator=OP, day=DAY, now=as_of + timedelta(hours=3))
    assert again.recleared and again.fingerprint == run.fingerprint

    # A changed tap of the closed day is caught by the sums' fingerprint.
    with engine.begin() as conn:
        tap_id = conn.execute(select(Tap.id).where(cr.taken_by(conn, run.id), Tap.kind == "purchase",
                                                   Tap.amount > 0).limit(1)).scalar_one()
        conn.execute(Tap.__table__.update().where(Tap.id == tap_id).values(route="R-changed"))
    with pytest.raises(cr.ClearingMismatch), engine.begin() as conn:
        cr.clear_day(conn, operator=OP, day=DAY, now=as_of + timedelta(hours=4))
