"""The auditor: every figure of an operator's stored clearing runs, derived again from the raw tables with plain SQL.

It shares no code with what it audits: nothing here imports ``clearing`` or ``backoffice.clearing_runs`` (nor the
ORM models); the SQL text is its own, the service day's bounds come from ``zoneinfo`` directly, and the commission
rule is checked from its definition (half away from zero of the total, rows sharing it within a fen of their exact
share). A difference is a (figure, stored, re-derived) triple; ``audit`` returns them, ``farebox audit`` prints them
and exits 1 when there is any.

What is checked, per run of the operator (every run, or the run of one service day):

- **the chain**: runs follow each other day by day; each carries on from the previous run's ``as_of``;
- **the rate**: the run's ``rate_bp`` is the commission rate in force on its day;
- **every row**: taps and gross by operator, fleet, route, vehicle, driver and card type, for the day's own taps
  and for the late taps of earlier days it carries, equal COUNT and SUM over the taps the run took; no stored row
  without taps behind it, no taps without their row;
- **commission and net**: a section's commission is its gross times the rate, rounded half away from zero; every
  breakdown's commissions add up to it, each within a fen of its exact share; net = gross - commission;
- **the run's totals**: equal its rows (and the reconciliation items carried into it);
- **membership**: every stored purchase of a cleared day is in exactly one run (a tap of a day whose run was made,
  received before the last run was made, in none is a difference; a tap in two is one);
- **no duplicates**: no two stored records with one device key (device, journal epoch where stored, sequence); no
  card transaction (card, card counter) stored twice as purchases;
- **money**: per service day, what the cards lost (the day's stored purchases) = fares settled (the gross the runs
  stored for that day) + fares still on their way (the day's purchases in no run yet).

Ticket revenue (issue 11), when the schema has it (revisions 0021 and 0024), from ``ticket_use``, ``ticket``,
``product``, ``ticket_order`` and ``ticket_revenue_rule`` with the rules written out again here (``_ticket_value``):

- **each line** of the ticket ledger: a use line stands for a counting use of its operator (never a flagged one)
  with the route, vehicle and driver of the use and the value its product's rule gives; a pass-day line is the day's
  share of a spread pass; no use is in two lines (the unique ref) and every counting use of a day up to the last
  run but one, received before that run, is in one;
- **each ticket**: never more recognised than its price; all of it recognised (uses, days, breakage) once its
  validity ended by the last run's day; nothing kept on a ticket refunded before the last run;
- **the rows**: a run's ``ticket`` / ``ticket_late`` rows by operator, route, vehicle, driver, product, channel and
  source equal COUNT and SUM over the lines it recognised; commission 0, net = gross.

Which taps a run took is read from where the schema keeps it (``_membership``): the tap's claim by a run when the
tap table has one, otherwise the run's window (``as_of``, ``carried_from``) over ``received_at``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Date, DateTime, Engine, bindparam, inspect, text

DIMENSIONS = ("operator", "fleet", "route", "vehicle", "driver", "card_type")
BP = 10_000


@dataclass(frozen=True)
class Difference:
    figure: str  # what, in a clerk's words: "run 3 (2026-03-05) day route R1 gross"
    stored: object
    rederived: object

    def line(self) -> str:
        return f"{self.figure}: stored {self.stored}, re-derived {self.rederived}"


# ------------------------------------------------------------------------------------------------ service days
def _first_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The earliest UTC instant whose local wall clock in ``zone`` reads ``wall`` or later."""
    at = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if at.astimezone(zone).replace(tzinfo=None) == wall:
        return at  # exists (on an autumn night twice: fold 0 is the first)
    # A wall time skipped by a spring-forward gap: the day starts when the clock jumps, found minute by minute.
    at = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    while at.astimezone(zone).replace(tzinfo=None) < wall:
        at += timedelta(minutes=1)
    return at


def day_window(day: date, tz: str, cutoff_hour: int) -> tuple[datetime, datetime]:
    """[start, end) in UTC of a service day: from the cut-off hour local time to the same wall-clock hour next day."""
    zone = ZoneInfo(tz)
    return (_first_instant(datetime.combine(day, time(cutoff_hour)), zone),
            _first_instant(datetime.combine(day + timedelta(days=1), time(cutoff_hour)), zone))


def commission(gross: int, rate_bp: int) -> int:
    """gross * rate / 10000, half away from zero (the definition the runs print; written here on its own)."""
    q, r = divmod(abs(gross) * rate_bp, BP)
    q += 2 * r >= BP
    return q if gross >= 0 else -q


def _utc(value) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite without a declared type on a computed column
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _day(value) -> date:
    return date.fromisoformat(value) if isinstance(value, str) else value


# ------------------------------------------------------------------------------------------------ the SQL
_RUNS = text("""
SELECT id, service_day, as_of, carried_from, rate_bp, tz, cutoff_hour,
       day_taps, day_gross, day_commission, day_net, late_taps, late_gross, late_commission, late_net,
       reconciliation_gross, reconciliation_commission, reconciliation_net
FROM clearing_run WHERE operator = :operator ORDER BY service_day
""")

_RATE = text("""
SELECT rate_bp FROM commission_rate WHERE operator = :operator AND valid_from <= :day
ORDER BY valid_from DESC LIMIT 1
""").bindparams(bindparam("day", type_=Date()))

_FIRST_PURCHASE = text("""
SELECT MIN(occurred_at) AS first_at FROM tap WHERE operator = :operator AND kind = 'purchase'
""").columns(first_at=DateTime(timezone=True))

_STORED_ROWS = text("""
SELECT w.run_id, w.section, w.for_day, w.dimension, w.key, w.taps, w.gross, w.commission, w.net
FROM clearing_row w JOIN clearing_run r ON r.id = w.run_id
WHERE r.operator = :operator
""")

_CARRIED_ITEMS = text("""
SELECT id, carried_run_id, adjustment FROM recon_item WHERE operator = :operator AND carried_run_id IS NOT NULL
""")

# Each purchase with its service day (the days table is bound in as VALUES, see _days_cte) and its vehicle's fleet
# on that day ("" when in none).
_TAP_DAY = """
tap_day AS (
  SELECT t.id, t.received_at, t.route, t.vehicle, t.driver, t.card_type, t.amount, d.for_day,
         COALESCE((SELECT fv.fleet FROM fleet_vehicle fv JOIN fleet f ON f.code = fv.fleet
                   WHERE fv.vehicle = t.vehicle AND f.operator = :operator AND fv.valid_from <= d.for_day
                   ORDER BY fv.valid_from DESC LIMIT 1), '') AS fleet
  FROM tap t JOIN days d ON t.occurred_at >= d.day_start AND t.occurred_at < d.day_end
  WHERE t.operator = :operator AND t.kind = 'purchase'
)"""

# Which run took which tap, by the run's window: its own day's purchases received before as_of, and earlier days'
# received in [carried_from, as_of).
_MEMBER_BY_WINDOW = """
member AS (
  SELECT r.id AS run_id, td.id AS tap_id, td.for_day,
         CASE WHEN td.for_day = r.service_day THEN 'day' ELSE 'late' END AS section
  FROM clearing_run r JOIN tap_day td
    ON td.received_at < r.as_of
   AND (td.for_day = r.service_day
        OR (td.for_day < r.service_day AND (r.carried_from IS NULL OR td.received_at >= r.carried_from)))
  WHERE r.operator = :operator
)"""

# Which run took which tap, by the tap's own claim (a run id written on the tap when the run took it).
_MEMBER_BY_CLAIM = """
member AS (
  SELECT r.id AS run_id, td.id AS tap_id, td.for_day,
         CASE WHEN td.for_day = r.service_day THEN 'day' WHEN td.for_day < r.service_day THEN 'late'
              ELSE 'ahead' END AS section
  FROM tap_day td JOIN {tap} t ON t.id = td.id JOIN clearing_run r ON r.id = t.{claim}
  WHERE r.operator = :operator
)"""

_KEYS = {"operator": None, "fleet": "td.fleet", "route": "td.route", "vehicle": "td.vehicle", "driver": "td.driver",
         "card_type": "CAST(td.card_type AS VARCHAR(20))"}


def _rederived_rows_sql() -> str:
    parts = []
    for dim in DIMENSIONS:
        key = _KEYS[dim]
        parts.append(f"""SELECT m.run_id, m.section, m.for_day, '{dim}' AS dimension,
       {key or 'CAST(:operator AS VARCHAR(32))'} AS key, COUNT(*) AS taps, SUM(td.amount) AS gross
FROM member m JOIN tap_day td ON td.id = m.tap_id
GROUP BY m.run_id, m.section, m.for_day{', ' + key if key else ''}""")
    return "\nUNION ALL\n".join(parts)


_MEMBERSHIP_COUNTS = """
SELECT td.id, td.for_day, td.received_at, td.amount, COUNT(m.run_id) AS runs
FROM tap_day td LEFT JOIN member m ON m.tap_id = td.id
GROUP BY td.id, td.for_day, td.received_at, td.amount
"""

_DUPLICATE_KEYS = """
SELECT {key}, COUNT(*) FROM tap WHERE operator = :operator GROUP BY {key} HAVING COUNT(*) > 1
"""

_DUPLICATE_CARD_TX = text("""
SELECT card_asn, card_ttc, COUNT(*) FROM tap WHERE operator = :operator AND kind = 'purchase'
GROUP BY card_asn, card_ttc HAVING COUNT(*) > 1
""")


def _membership(conn: Connection) -> tuple[str, bool]:
    """The ``member`` CTE for the schema at hand (by the run id each tap carries since revision 0012, or before it by
    the runs' windows) and whether it is by window."""
    if "clearing_run_id" in {c["name"] for c in inspect(conn).get_columns("tap")}:
        # Since revision 0027 a run's block of its day carries no id: the view tap_claimed names the run of each.
        tap = "tap_claimed" if "tap_claimed" in inspect(conn).get_view_names() else "tap"
        return _MEMBER_BY_CLAIM.format(claim="clearing_run_id", tap=tap), False
    return _MEMBER_BY_WINDOW, True


def _device_key(conn: Connection) -> str:
    cols = {c["name"] for c in inspect(conn).get_columns("tap")}
    epoch = next((c for c in ("journal_epoch", "epoch", "device_epoch") if c in cols), None)
    return f"device_id, {epoch}, device_seq" if epoch else "device_id, device_seq"


def _days_cte(days: dict[date, tuple[datetime, datetime]]) -> tuple[str, list]:
    """``days(for_day, day_start, day_end)`` as a VALUES list with typed parameters (both databases)."""
    rows, params = [], []
    for i, (d, (start, end)) in enumerate(sorted(days.items())):
        rows.append(f"(:d{i}, :s{i}, :e{i})")
        params += [bindparam(f"d{i}", d, type_=Date()), bindparam(f"s{i}", start, type_=DateTime(timezone=True)),
                   bindparam(f"e{i}", end, type_=DateTime(timezone=True))]
    return f"days (for_day, day_start, day_end) AS (VALUES {', '.join(rows)})", params


# ------------------------------------------------------------------------------------------------ the audit
def snapshot(engine: Engine) -> Connection:
    """A connection whose queries all read one snapshot (PostgreSQL: REPEATABLE READ), so that an audit made while
    ingest commits compares figures of the same moment. SQLite has one writer, and the audit is short."""
    conn = engine.connect()
    if engine.dialect.name == "postgresql":
        conn.execution_options(isolation_level="REPEATABLE READ")
    return conn


@dataclass
class AuditResult:
    operator: str
    runs: int
    taps: int  # stored purchases looked at
    differences: list[Difference]

    @property
    def clean(self) -> bool:
        return not self.differences


def audit(conn: Connection, *, operator: str, day: date | None = None) -> AuditResult:
    """Audit ``operator``'s stored runs (all, or the run of service ``day`` and that day's taps)."""
    tz_row = conn.execute(text("SELECT timezone, cutoff_hour FROM operator WHERE code = :operator"),
                          {"operator": operator}).first()
    if tz_row is None:
        raise LookupError(f"operator {operator!r} is not registered: check the code (farebox registry names)")
    runs = conn.execute(_RUNS, {"operator": operator}).mappings().all()
    out: list[Difference] = []
    if not runs:
        return AuditResult(operator, 0, 0, out)
    first = conn.execute(_FIRST_PURCHASE, {"operator": operator}).scalar()
    tz, cutoff = runs[-1]["tz"], runs[-1]["cutoff_hour"]
    last_day = _day(runs[-1]["service_day"])
    first_day = min(_day(runs[0]["service_day"]), _service_day(_utc(first), tz, cutoff) if first else last_day)
    # Days from the first purchase to a day past the last run, so every tap up to then has its service day.
    days = {first_day + timedelta(n): day_window(first_day + timedelta(n), tz, cutoff)
            for n in range((last_day - first_day).days + 2)}
    days_cte, params = _days_cte(days)
    member, by_window = _membership(conn)
    head = f"WITH {days_cte},\n{_TAP_DAY},\n{member}\n"
    bind = {"operator": operator}

    def query(sql: str):
        return conn.execute(text(head + sql).bindparams(*params), bind)

    by_id = {r["id"]: r for r in runs}
    audited = [r for r in runs if day is None or _day(r["service_day"]) == day]
    if day is not None and not audited:
        out.append(Difference(f"{operator} {day}: clearing run", "none", "a run for the day (none stored)"))
    audited_ids = {r["id"] for r in audited}

    out += _chain(runs, audited_ids)
    out += _rates(conn, operator, audited)
    rederived = {(r.run_id, r.section, _day(r.for_day), r.dimension, str(r.key)): (int(r.taps), int(r.gross))
                 for r in query(_rederived_rows_sql()) if r.run_id in audited_ids}
    every_row = {(r.run_id, r.section, _day(r.for_day), r.dimension, str(r.key)): r
                 for r in conn.execute(_STORED_ROWS, {"operator": operator})}
    stored = {k: r for k, r in every_row.items() if k[0] in audited_ids}
    out += _rows(by_id, stored, rederived)
    out += _commissions(by_id, stored)
    out += _totals(conn, operator, by_id, audited, stored)
    counts = [r for r in query(_MEMBERSHIP_COUNTS) if day is None or _day(r.for_day) == day]
    out += _members(runs, counts, by_window)
    out += _duplicates(conn, operator)
    out += _money(every_row, counts, day)
    if inspect(conn).has_table("ticket_revenue") and inspect(conn).has_table("ticket_use"):
        out += _tickets(conn, operator, runs, audited_ids, stored)
    return AuditResult(operator, len(audited), len(counts), out)


def _service_day(at: datetime, tz: str, cutoff: int) -> date:
    wall = at.astimezone(ZoneInfo(tz)).replace(tzinfo=None)
    return (wall - timedelta(hours=cutoff)).date()


def _name(run) -> str:
    return f"run {run['id']} ({_day(run['service_day'])})"


def _chain(runs, audited_ids) -> list[Difference]:
    out = []
    for prev, run in zip([None, *runs[:-1]], runs, strict=True):
        if run["id"] not in audited_ids:
            continue
        want = None if prev is None else _utc(prev["as_of"])
        if _utc(run["carried_from"]) != want:
            out.append(Difference(f"{_name(run)} carried_from (the previous run's as_of)",
                                  _utc(run["carried_from"]), want))
        if prev is not None and _day(run["service_day"]) != _day(prev["service_day"]) + timedelta(days=1):
            out.append(Difference(f"{_name(run)} follows {_name(prev)}: day skipped", _day(run["service_day"]),
                                  _day(prev["service_day"]) + timedelta(days=1)))
        if prev is not None and _utc(run["as_of"]) < _utc(prev["as_of"]):
            out.append(Difference(f"{_name(run)} as_of before the previous run's", _utc(run["as_of"]),
                                  _utc(prev["as_of"])))
    return out


def _rates(conn, operator, audited) -> list[Difference]:
    out = []
    for run in audited:
        rate = conn.execute(_RATE, {"operator": operator, "day": _day(run["service_day"])}).scalar()
        if rate is None or int(rate) != int(run["rate_bp"]):
            out.append(Difference(f"{_name(run)} commission rate (bp)", run["rate_bp"], rate))
    return out


def _rows(by_id, stored, rederived) -> list[Difference]:
    out = []
    for key in sorted(set(stored) | set(rederived), key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        run_id, section, for_day, dim, k = key
        if section in ("reconciliation", "ticket", "ticket_late"):
            continue
        what = f"{_name(by_id[run_id])} {section} {for_day} {dim} {k!r}"
        if section == "ahead":  # a run took a purchase of a later day than its own
            out.append(Difference(f"{what}: taps of a later day taken (taps, gross)", None, rederived[key]))
            continue
        got = rederived.get(key, (0, 0))
        row = stored.get(key)
        have = (int(row.taps), int(row.gross)) if row is not None else None
        if have is None:
            out.append(Difference(f"{what}: no stored row (taps, gross)", None, got))
        elif key not in rederived and section == "day" and dim == "operator" and have == (0, 0):
            continue  # an empty day keeps its operator row of zeros
        elif have[0] != got[0]:
            out.append(Difference(f"{what} taps", have[0], got[0]))
        if have is not None and have[1] != got[1]:
            out.append(Difference(f"{what} gross", have[1], got[1]))
    return out


def _commissions(by_id, stored) -> list[Difference]:
    out = []
    sections = defaultdict(lambda: defaultdict(list))
    for (run_id, section, for_day, dim, k), row in stored.items():
        if section in ("day", "late"):
            sections[(run_id, section, for_day)][dim].append((k, row))
    for (run_id, section, for_day), dims in sorted(sections.items(), key=lambda kv: kv[0]):
        run = by_id[run_id]
        rate = int(run["rate_bp"])
        what = f"{_name(run)} {section} {for_day}"
        for dim, rows in dims.items():
            for k, row in rows:
                if int(row.net) != int(row.gross) - int(row.commission):
                    out.append(Difference(f"{what} {dim} {k!r} net (gross - commission)", int(row.net),
                                          int(row.gross) - int(row.commission)))
        top = dims.get("operator")
        if not top:
            out.append(Difference(f"{what}: operator row", None, "one row"))
            continue
        gross = int(top[0][1].gross)
        total_com = commission(gross, rate)
        if int(top[0][1].commission) != total_com:
            out.append(Difference(f"{what} commission at {rate} bp", int(top[0][1].commission), total_com))
        for dim, rows in dims.items():
            if dim == "operator":
                continue
            if sum(int(r.commission) for _, r in rows) != total_com:
                out.append(Difference(f"{what} commission by {dim}, summed", sum(int(r.commission) for _, r in rows),
                                      total_com))
            g_sum = sum(int(r.gross) for _, r in rows)
            for k, r in rows:
                # Each row's share is the floor or the ceiling of gross_i * C / G (largest remainder).
                if g_sum and not (int(r.commission) * g_sum - g_sum < int(r.gross) * total_com
                                  < int(r.commission) * g_sum + g_sum):
                    out.append(Difference(f"{what} {dim} {k!r} commission (share of {total_com})",
                                          int(r.commission), f"{int(r.gross) * total_com / g_sum:.2f}"))
    return out


def _totals(conn, operator, by_id, audited, stored) -> list[Difference]:
    out = []
    items = defaultdict(dict)
    for r in conn.execute(_CARRIED_ITEMS, {"operator": operator}):
        items[r.carried_run_id][str(r.id)] = int(r.adjustment or 0)
    for run in audited:
        rid = run["id"]
        for section in ("day", "late"):
            rows = [row for (i, s, _d, dim, _k), row in stored.items() if i == rid and s == section
                    and dim == "operator"]
            for col in ("taps", "gross", "commission", "net"):
                want = sum(int(getattr(r, col)) for r in rows)
                if int(run[f"{section}_{col}"]) != want:
                    out.append(Difference(f"{_name(run)} total {section}_{col} (its rows)",
                                          int(run[f"{section}_{col}"]), want))
        rec = {k: row for (i, s, _d, dim, k), row in stored.items() if i == rid and s == "reconciliation"}
        if set(rec) != set(items[rid]) or any(int(rec[k].gross) != v for k, v in items[rid].items()):
            out.append(Difference(f"{_name(run)} reconciliation rows (item: fen)",
                                  {k: int(r.gross) for k, r in sorted(rec.items())}, dict(sorted(items[rid].items()))))
        gross = sum(items[rid].values())
        com = sum(commission(v, int(run["rate_bp"])) for v in items[rid].values())
        for col, want in (("gross", gross), ("commission", com), ("net", gross - com)):
            if int(run[f"reconciliation_{col}"]) != want:
                out.append(Difference(f"{_name(run)} total reconciliation_{col}", int(run[f"reconciliation_{col}"]),
                                      want))
    return out


def _members(runs, counts, by_window: bool) -> list[Difference]:
    """No purchase is in two runs, and none that a run must have taken is in none.

    By window, a run took every purchase of its day (or earlier) received before its ``as_of``: such a tap in no
    run is a difference. By claim, a tap received before a run's moment but committed just after its claim waits
    for the next run, legitimately; but a run made after that one has claimed it (ingest commits within seconds,
    runs are a day apart), so the rule holds one run back: of a day up to the last run but one, received before
    that run's ``as_of``."""
    edge = runs[-1] if by_window else (runs[-2] if len(runs) > 1 else None)
    if edge is None:
        last_as_of, last_day = None, None
    else:
        last_as_of, last_day = _utc(edge["as_of"]), _day(edge["service_day"])
    out = []
    for r in counts:
        for_day, runs_n = _day(r.for_day), int(r.runs)
        due = last_day is not None and for_day <= last_day and _utc(r.received_at) < last_as_of
        if runs_n > 1 or (due and runs_n == 0):
            out.append(Difference(f"tap {r.id} ({for_day}, {int(r.amount)} fen) clearing runs", runs_n, 1))
    return out


def _duplicates(conn, operator) -> list[Difference]:
    key = _device_key(conn)
    out = [Difference(f"record ({', '.join(str(v) for v in r[:-1])}) stored", int(r[-1]), 1)
           for r in conn.execute(text(_DUPLICATE_KEYS.format(key=key)), {"operator": operator})]
    out += [Difference(f"card {r.card_asn} counter {r.card_ttc} purchases stored", int(r[2]), 1)
            for r in conn.execute(_DUPLICATE_CARD_TX, {"operator": operator})]
    return out


def _money(stored, counts, day) -> list[Difference]:
    """Per service day: the cards lost (stored purchases) = settled (gross the runs stored) + still on its way."""
    lost, waiting = defaultdict(int), defaultdict(int)
    for r in counts:
        lost[_day(r.for_day)] += int(r.amount)
        if int(r.runs) == 0:
            waiting[_day(r.for_day)] += int(r.amount)
    settled = defaultdict(int)
    for (_run_id, section, for_day, dim, _k), row in stored.items():
        if section in ("day", "late") and dim == "operator":
            settled[for_day] += int(row.gross)
    out = []
    for d in sorted(set(lost) | set(settled)):
        if day is not None and d != day:
            continue
        if lost[d] != settled[d] + waiting[d]:
            out.append(Difference(f"{d}: cards lost (fen) vs settled {settled[d]} + on its way {waiting[d]}",
                                  settled[d] + waiting[d], lost[d]))
    return out


# ------------------------------------------------------------------------------------------------ tickets
_TICKET_LINES = text("""
SELECT l.id, l.run_id, l.ref, l.source, l.ticket_id, l.use_id, l.for_day, l.route, l.vehicle, l.driver, l.product,
       l.channel, l.amount
FROM ticket_revenue l WHERE l.operator = :operator
""")

_TICKETS = text("""
SELECT t.ticket_id, t.kind, t.price_fen, t.uses_allowed, t.valid_from, t.valid_to, t.state, t.updated_at,
       t.issued_at, p.code AS product, o.channel, rr.rule, rr.ride_value_fen
FROM ticket t JOIN product p ON p.id = t.product_id JOIN ticket_order o ON o.order_id = t.order_id
LEFT JOIN ticket_revenue_rule rr ON rr.product_id = t.product_id
WHERE t.operator = :operator
""").columns(valid_from=DateTime(timezone=True), valid_to=DateTime(timezone=True),
             updated_at=DateTime(timezone=True), issued_at=DateTime(timezone=True))

_USES = text("""
SELECT id, ticket_id, use_no, revenue, route, vehicle, driver, occurred_at, received_at
FROM ticket_use WHERE operator = :operator
""").columns(occurred_at=DateTime(timezone=True), received_at=DateTime(timezone=True))

_TICKET_DIMENSIONS = ("route", "vehicle", "driver", "product", "channel", "source")


def _ticket_rule(t) -> str:
    passes = ("day_pass", "month_pass")
    if t.kind in passes:
        return t.rule or "spread"
    return "at_use"


def _ticket_value(t, use_no: int) -> int:
    """What a counting use earns, written out again from the rule's statement (clearing.tickets' docstring)."""
    price, rule = int(t.price_fen), _ticket_rule(t)
    if rule == "spread":
        return 0
    if rule == "per_ride":
        value = int(t.ride_value_fen or 0)
        return max(0, min(value, price - (use_no - 1) * value))
    n = int(t.uses_allowed)
    if n <= 0:
        return price if use_no == 1 else 0
    return price * use_no // n - price * (use_no - 1) // n if use_no <= n else 0


def _tickets(conn, operator, runs, audited_ids, stored) -> list[Difference]:
    bind = {"operator": operator}
    lines = conn.execute(_TICKET_LINES, bind).all()
    tickets = {int(t.ticket_id): t for t in conn.execute(_TICKETS, bind)}
    uses = {int(u.id): u for u in conn.execute(_USES, bind)}
    tz, cutoff = runs[-1]["tz"], runs[-1]["cutoff_hour"]
    out: list[Difference] = []
    by_use = defaultdict(list)
    held = defaultdict(int)
    for line in lines:
        held[int(line.ticket_id)] += int(line.amount)
        t = tickets.get(int(line.ticket_id))
        what = f"ticket line {line.ref}"
        if t is None:
            out.append(Difference(f"{what}: ticket", None, "a ticket of the operator"))
            continue
        if (line.product, line.channel) != (t.product, t.channel):
            out.append(Difference(f"{what} product/channel", (line.product, line.channel), (t.product, t.channel)))
        if line.source == "use":
            by_use[int(line.use_id)].append(line)
            u = uses.get(int(line.use_id))
            if u is None or not u.revenue or u.use_no is None:
                out.append(Difference(f"{what}: a counting use behind it", None if u is None else u.revenue, True))
                continue
            # the ledger keeps 32 characters of each (a counter's station name may be longer)
            want = (_ticket_value(t, int(u.use_no)), u.route[:32], u.vehicle[:32], u.driver[:32],
                    _service_day(_utc(u.occurred_at), tz, cutoff))
            have = (int(line.amount), line.route, line.vehicle, line.driver, _day(line.for_day))
            if have != want:
                out.append(Difference(f"{what} (fen, route, vehicle, driver, day)", have, want))
        elif line.source == "pass_day":
            first = _service_day(_utc(t.valid_from), tz, cutoff)
            last = _service_day(_utc(t.valid_to) - timedelta(microseconds=1), tz, cutoff)
            n, i = (last - first).days + 1, (_day(line.for_day) - first).days
            price = int(t.price_fen)
            want = price * (i + 1) // n - price * i // n if 0 <= i < n and _ticket_rule(t) == "spread" else None
            if int(line.amount) != want:
                out.append(Difference(f"{what} (share of {price} fen over {n} days)", int(line.amount), want))
    last_run = runs[-1]
    edge = runs[-2] if len(runs) > 1 else None
    for use_id, u in uses.items():
        n = len(by_use.get(use_id, []))
        due = (edge is not None and u.revenue and u.use_no is not None
               and _service_day(_utc(u.occurred_at), tz, cutoff) <= _day(edge["service_day"])
               and _utc(u.received_at) < _utc(edge["as_of"]))
        if n > 1 or (due and n == 0):
            out.append(Difference(f"ticket use {use_id} (ticket {u.ticket_id}) in ticket lines", n, 1))
    last_end = day_window(_day(last_run["service_day"]), tz, cutoff)[1]
    for ticket_id, t in tickets.items():
        price, have = int(t.price_fen), held.get(ticket_id, 0)
        # a refund the last run could see: before its moment and before its day's end
        refunded = t.state == "refunded" and _utc(t.updated_at) < min(_utc(last_run["as_of"]), last_end)
        if have > price:
            out.append(Difference(f"ticket {ticket_id} recognised (fen), at most its price", have, price))
        if refunded and have:
            out.append(Difference(f"ticket {ticket_id} refunded: recognised (fen)", have, 0))
        elif (not refunded and _utc(t.valid_to) <= last_end and _utc(t.issued_at) < _utc(last_run["as_of"])
              and have != price):
            out.append(Difference(f"ticket {ticket_id} validity over: recognised (fen)", have, price))
    want_rows = defaultdict(lambda: [0, 0])
    for line in lines:
        if line.run_id not in audited_ids:
            continue
        run = next(r for r in runs if r["id"] == line.run_id)
        for_day = _day(line.for_day)
        section = "ticket" if for_day == _day(run["service_day"]) else "ticket_late"
        uses_n = 1 if line.source == "use" else 0
        for dim, key in (("operator", operator), *((d, getattr(line, d)) for d in _TICKET_DIMENSIONS)):
            cell = want_rows[(line.run_id, section, for_day, dim, str(key))]
            cell[0] += uses_n
            cell[1] += int(line.amount)
    have_rows = {k: r for k, r in stored.items() if k[1] in ("ticket", "ticket_late")}
    for key in sorted(set(have_rows) | set(want_rows), key=str):
        row, want = have_rows.get(key), tuple(want_rows.get(key, (0, 0)))
        what = f"run {key[0]} {key[1]} {key[2]} {key[3]} {key[4]!r}"
        have = None if row is None else (int(row.taps), int(row.gross))
        if have != want:
            out.append(Difference(f"{what} (uses, fen)", have, want))
        if row is not None and (int(row.commission) != 0 or int(row.net) != int(row.gross)):
            out.append(Difference(f"{what} commission, net (no issuer commission on tickets)",
                                  (int(row.commission), int(row.net)), (0, int(row.gross))))
    return out


__all__ = ["AuditResult", "Difference", "audit", "commission", "day_window", "snapshot"]
