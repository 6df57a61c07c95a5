"""`python -m bench report`: a month's settlement PDF for a big operator (300 routes, 2,000 vehicles, 3,000
drivers, 8 fleets; issue 5's goal: <= 10 s), beside two baselines made from the same tables in the same run:

- a bare reportlab document: the same number of table rows as plain strings in default-styled tables, no charts,
  no page headers, no CJK font (what any PDF of these rows costs at least);
- the same tables written as CSV with pandas (what getting the rows out at all costs).

Also timed: farebox's CSV (UTF-8 with BOM, yuan columns) and XLSX (openpyxl) of the same tables. The month is
synthetic, built with numpy from a fixed seed: every vehicle runs two shifts a day for 30 days, each shift on a
route and with a driver drawn at random, taps and fares drawn per shift, the issuer's commission 0.6 % of each
shift's gross rounded down to the fen; the tables are the sums of those shift rows by route, vehicle, driver,
fleet, day and hour (np.add.at on int64: money never goes through a float). Times are medians of `rounds` runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from reportlab.lib.pagesizes import A4
from reportlab.platypus import SimpleDocTemplate, Table

from bench.common import fmt_ratio, ratio, table, write_result
from reports.monthly import month_bounds, write_monthly_pdf
from reports.settlement_doc import ClearingRun, SettlementTables
from reports.tables import write_settlement_csv, write_settlement_xlsx

GOAL_S = 10.0
COMMISSION_BP = 60  # the issuer's commission in basis points of gross
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华"


def _sum_by(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, index, values)
    return out


def synthetic_month(*, routes: int = 300, vehicles: int = 2000, drivers: int = 3000, fleets: int = 8,
                    year: int = 2024, month: int = 5, seed: int = 5) -> SettlementTables:
    """A month of settlement tables for an operator of that size (see the module docstring)."""
    rnd = np.random.default_rng(seed)
    first, last = month_bounds(year, month)
    days = (last - first).days + 1
    n = vehicles * 2 * days  # shift rows
    vehicle = np.tile(np.repeat(np.arange(vehicles), 2), days)
    day = np.repeat(np.arange(days), vehicles * 2)
    route = (vehicle * 7 + rnd.integers(0, 3, n)) % routes  # a vehicle mostly keeps to a few routes
    driver = rnd.integers(0, drivers, n)
    taps = rnd.poisson(160, n).astype(np.int64)
    fare = rnd.choice(np.array([100, 150, 200, 300], dtype=np.int64), n)
    gross = taps * fare - rnd.integers(0, 40, n) * 50  # some riders pay half or nothing
    gross = np.maximum(gross, 0)
    commission = gross * COMMISSION_BP // 10_000
    net = gross - commission
    fleet_of_vehicle = np.arange(vehicles) % fleets

    def frame(key: str, idx: np.ndarray, size: int, codes: list) -> pd.DataFrame:
        return pd.DataFrame({key: codes, "taps": _sum_by(idx, taps, size), "gross": _sum_by(idx, gross, size),
                             "commission": _sum_by(idx, commission, size), "net": _sum_by(idx, net, size)})

    route_codes = [f"R{r + 1:03d}" for r in range(routes)]
    vehicle_codes = [f"V{v + 1:04d}" for v in range(vehicles)]
    driver_codes = [f"D{d + 1:04d}" for d in range(drivers)]
    fleet_codes = [f"F{f + 1}" for f in range(fleets)]
    hour_share = np.array([1, 1, 0, 0, 0, 2, 6, 12, 14, 9, 6, 6, 7, 6, 6, 7, 9, 13, 12, 7, 5, 4, 3, 2], dtype=np.int64)
    month_taps = int(taps.sum())
    by_hour = month_taps * hour_share // hour_share.sum()
    by_hour[8] += month_taps - int(by_hour.sum())  # the rounding remainder in the morning peak
    return SettlementTables(
        operator="citybus",
        operator_name="城市公交集团 City Bus Group",
        first_day=first,
        last_day=last,
        by_fleet=frame("fleet", fleet_of_vehicle[vehicle], fleets, fleet_codes),
        by_route=frame("route", route, routes, route_codes),
        by_vehicle=frame("vehicle", vehicle, vehicles, vehicle_codes),
        by_driver=frame("driver", driver, drivers, driver_codes),
        by_day=frame("day", day, days, [date(year, month, d + 1) for d in range(days)]),
        taps_by_hour=pd.DataFrame({"hour": np.arange(24), "taps": by_hour}),
        run=ClearingRun(f"{year}-{month:02d}/1", datetime(year, month % 12 + 1, 1, 19, 30, tzinfo=UTC)),
        generated_at=datetime(year, month % 12 + 1, 1, 19, 31, tzinfo=UTC),
        names={
            "fleet": {c: f"第{i + 1}车队" for i, c in enumerate(fleet_codes)},
            "route": {c: f"{i + 1}路" for i, c in enumerate(route_codes)},
            "vehicle": {c: f"沪A-{10000 + i}" for i, c in enumerate(vehicle_codes)},
            "driver": {c: SURNAMES[i % len(SURNAMES)] + GIVEN[i // len(SURNAMES) % len(GIVEN)]
                       + GIVEN[i * 7 % len(GIVEN)] for i, c in enumerate(driver_codes)},
        },
    )


def bare_pdf(tables: SettlementTables, path: Path) -> None:
    """The baseline: the same rows as plain strings in default tables, nothing else."""
    story = []
    for frame in [tables.by_day, *tables.breakdowns().values()]:
        key = frame.columns[0]
        rows = [[str(k), str(t), str(g), str(c), str(n)] for k, t, g, c, n in zip(
            frame[key].tolist(), frame["taps"].tolist(), frame["gross"].tolist(), frame["commission"].tolist(),
            frame["net"].tolist())]
        story.append(Table([[key, "taps", "gross", "commission", "net"], *rows], repeatRows=1))
    SimpleDocTemplate(str(path), pagesize=A4).build(story)


def bare_csv(tables: SettlementTables, directory: Path) -> None:
    for name, frame in {"by_day": tables.by_day, **tables.breakdowns()}.items():
        frame.to_csv(directory / f"bare-{name}.csv", index=False)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(*, routes: int = 300, vehicles: int = 2000, drivers: int = 3000, rounds: int = 3, console,
        results_dir) -> dict:
    t0 = time.perf_counter()
    tables = synthetic_month(routes=routes, vehicles=vehicles, drivers=drivers)
    build_s = time.perf_counter() - t0
    rows = sum(len(f) for f in [tables.by_day, *tables.breakdowns().values()])
    times: dict[str, list[float]] = {k: [] for k in ("pdf", "bare_pdf", "csv", "bare_csv", "xlsx")}
    pages = 0
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        d = Path(tmp)
        for _ in range(rounds):  # interleaved, so that a noisy moment hits every variant alike
            times["pdf"].append(_timed(lambda: write_monthly_pdf(tables, d / "month.pdf")))
            times["bare_pdf"].append(_timed(lambda: bare_pdf(tables, d / "bare.pdf")))
            times["csv"].append(_timed(lambda: write_settlement_csv(tables, d)))
            times["bare_csv"].append(_timed(lambda: bare_csv(tables, d)))
            times["xlsx"].append(_timed(lambda: write_settlement_xlsx(tables, d / "month.xlsx")))
        from pypdf import PdfReader  # only to count pages; the test extra has it

        pages = len(PdfReader(d / "month.pdf").pages)
        pdf_bytes = (d / "month.pdf").stat().st_size
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    doc = {
        "size": {"routes": routes, "vehicles": vehicles, "drivers": drivers, "fleets": len(tables.by_fleet),
                 "days": len(tables.by_day), "table_rows": rows, "shift_rows": vehicles * 2 * len(tables.by_day)},
        "rounds": rounds,
        "synthetic_month_s": round(build_s, 3),
        "median_s": med,
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "pdf_pages": pages,
        "pdf_bytes": pdf_bytes,
        "ratio_pdf_to_bare_pdf": ratio(med["pdf"], med["bare_pdf"]),
        "ratio_csv_to_bare_csv": ratio(med["csv"], med["bare_csv"]),
        "goal": {"pdf_s_max": GOAL_S, "met": med["pdf"] <= GOAL_S},
    }
    console.print(table(
        f"report: a month's settlement, {routes} routes, {vehicles:,} vehicles, {drivers:,} drivers "
        f"({rows:,} table rows; median of {rounds})",
        ["what", "median", "beside", "ratio"],
        [["monthly PDF (charts, headers, CJK)", f"{med['pdf']:.2f} s", f"bare reportlab {med['bare_pdf']:.2f} s",
          fmt_ratio(doc["ratio_pdf_to_bare_pdf"])],
         ["CSV (BOM, yuan columns, names)", f"{med['csv']:.3f} s", f"bare pandas to_csv {med['bare_csv']:.3f} s",
          fmt_ratio(doc["ratio_csv_to_bare_csv"])],
         ["XLSX (openpyxl)", f"{med['xlsx']:.2f} s", "-", "-"]],
        caption=f"PDF: {pages} pages, {pdf_bytes / 1e6:.1f} MB. Goal: PDF <= {GOAL_S:.0f} s: "
                f"{'met' if doc['goal']['met'] else 'NOT met'}. Synthetic month built in {build_s:.2f} s."))
    path = write_result("report", doc, results_dir)
    console.print(f"results: {path}")
    return doc
