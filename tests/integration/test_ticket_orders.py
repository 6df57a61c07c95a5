"""Ticket orders on SQLite and PostgreSQL (backoffice.tickets, revision 2026_12_03_0020): the revision builds what
the models describe; an order goes created -> paid -> issued -> used / refunded / expired with one audit line per
change; seats are never oversold, also by many buyers at once on separate PostgreSQL connections (checked with plain
SQL); an unpaid order's seats come back at expiry; a notification and a query (or the same notification twice, at
once) pay once; only unused tickets are refunded; the token verifies with the tests' own Ed25519 reference and the
pickup code maps back to its ticket."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import MetaData, text

from backoffice import models, registry
from backoffice.db import make_engine, upgrade
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest, OrderError

NOW = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai, service day 2026-12-03
DAY = date(2026, 12, 3)
KEYS = published_test_keys()
OP = "coachco"
MY_TABLES = ("product", "departure", "ticket_order", "order_item", "ticket", "seat_hold", "order_audit")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    return (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
            else request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def engine(url):
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=NOW - timedelta(days=30))
        registry.add_route(conn, code="C1", operator=OP, name="City - Airport", flat_fare=200,
                           at=NOW - timedelta(days=30))
        registry.add_route(conn, code="C2", operator=OP, name="City - Harbour", flat_fare=200,
                           at=NOW - timedelta(days=30))
        catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="One ride", price_fen=200,
                              by="clerk", now=NOW)
        catalogue.add_product(conn, operator=OP, code="day", kind="day_pass", name="Day pass", price_fen=1500,
                              routes=["C1", "C2"], by="clerk", now=NOW)
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Airport coach",
                              price_fen=3000, by="clerk", now=NOW)
    yield engine
    engine.dispose()


def departure(engine, seats=3, departs="18:30", route="C1") -> int:
    with engine.begin() as conn:
        return catalogue.add_departure(conn, operator=OP, product="coach", route=route, service_date=DAY,
                                       departs=departs, seats=seats).id


def sql(engine, query: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


def seat_books(engine, departure_id: int) -> tuple[int, int, int, int]:
    """(seats, seats_taken, seats of live holds, coach tickets not refunded) in plain SQL."""
    (seats, taken), = sql(engine, "SELECT seats, seats_taken FROM departure WHERE id = :d", d=departure_id)
    (held,), = sql(engine, "SELECT COALESCE(SUM(seats), 0) FROM seat_hold WHERE departure_id = :d "
                           "AND state IN ('held', 'sold')", d=departure_id)
    (sold,), = sql(engine, "SELECT COUNT(*) FROM ticket WHERE departure_id = :d AND state <> 'refunded'",
                   d=departure_id)
    return seats, taken, held, sold


def as_utc(value) -> datetime:
    """A time read with plain SQL: SQLite hands back text, PostgreSQL an aware datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def audit_trail(engine, order_id: str) -> list[tuple]:
    return [tuple(r) for r in sql(engine, "SELECT from_state, to_state FROM order_audit WHERE order_id = :o "
                                          "ORDER BY id", o=order_id)]


def buy(engine, items, *, now=NOW, channel="web", phone="13800138000", key=None) -> str:
    with engine.begin() as conn:
        return orders.create_order(conn, operator=OP, channel=channel, phone=phone, items=items, who="rider",
                                   idempotency_key=key, now=now)


def pay(engine, order_id, ref, *, now=NOW + timedelta(minutes=2), amount=None):
    with engine.begin() as conn:
        if amount is None:
            (amount,), = conn.execute(text("SELECT total_fen FROM ticket_order WHERE order_id = :o"),
                                      {"o": order_id}).all()
        return orders.mark_paid(conn, order_id, amount_fen=amount, payment_ref=ref, who="platform", now=now)


def issue(engine, order_id, *, now=NOW + timedelta(minutes=3)):
    with engine.begin() as conn:
        return orders.issue_tickets(conn, order_id, keys=KEYS, who="shop", now=now)


def test_the_revision_builds_what_the_models_describe(engine):
    reflected = MetaData()
    reflected.reflect(engine)
    for name in MY_TABLES:
        table, got = models.Base.metadata.tables[name], reflected.tables[name]
        assert set(got.columns.keys()) == set(table.columns.keys()), name
        for column in table.columns:
            assert got.columns[column.name].nullable == column.nullable, f"{name}.{column.name}"


def test_the_revision_downgrades_to_the_heads_it_joined_and_back(engine):
    from alembic import command

    from backoffice.db import alembic_config

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "2026_12_03_0018")  # one of the heads 0020 joined: only 0020 is undone
    reflected = MetaData()
    reflected.reflect(engine)
    assert not set(MY_TABLES) & set(reflected.tables) and {"alarm", "operator", "route"} <= set(reflected.tables)
    upgrade(engine)
    reflected = MetaData()
    reflected.reflect(engine)
    assert set(MY_TABLES) <= set(reflected.tables)


def test_an_order_goes_created_paid_issued_used_with_an_audit_line_each(engine):
    order_id = buy(engine, [ItemRequest("ride", 2), ItemRequest("day")])
    (state, total), = sql(engine, "SELECT state, total_fen FROM ticket_order WHERE order_id = :o", o=order_id)
    assert (state, total) == ("created", 2 * 200 + 1500)
    assert pay(engine, order_id, "PAY-1").outcome == "paid"
    tickets = issue(engine, order_id)
    assert len(tickets) == 3 and all(t.token.startswith("FT1.") and len(t.pickup_code) == 16 for t in tickets)
    # the token says what the row says, checked with the tests' own Ed25519 and byte layout
    from reference_ticket import ref_keypair, ref_untext, ref_verify

    _, public = ref_keypair(KEYS.seed)
    for t in tickets:
        body, signature = ref_untext(t.token)
        assert ref_verify(body, signature, public)
        assert int.from_bytes(body[2:10], "big") == t.ticket_id
    rows = sql(engine, "SELECT ticket_id, kind, uses_allowed, valid_from, valid_to FROM ticket WHERE order_id = :o",
               o=order_id)
    day_pass = [r for r in rows if r.kind == "day_pass"]
    assert len(rows) == 3 and len(day_pass) == 1 and day_pass[0].uses_allowed == 0
    # the day pass covers the operator's service day: 03:00 Shanghai (19:00 UTC the day before) to the next 03:00
    assert as_utc(day_pass[0].valid_from) == datetime(2026, 12, 2, 19, 0, tzinfo=UTC)
    assert as_utc(day_pass[0].valid_to) == datetime(2026, 12, 3, 19, 0, tzinfo=UTC)
    # asked again: the same tickets, nothing new
    assert [t.ticket_id for t in issue(engine, order_id)] == [t.ticket_id for t in tickets]
    assert sql(engine, "SELECT COUNT(*) FROM ticket WHERE order_id = :o", o=order_id)[0][0] == 3
    # the pickup code of each ticket maps back to it
    with engine.connect() as conn:
        for t in tickets:
            assert orders.ticket_by_pickup_code(conn, operator=OP, code=t.pickup_code, keys=KEYS) == t.ticket_id
    with engine.begin() as conn:
        for t in tickets:
            if t.kind == "single":
                assert orders.record_use(conn, t.ticket_id, who="bus", at=NOW + timedelta(hours=1)) == 1
                assert orders.record_use(conn, t.ticket_id, who="bus", at=NOW + timedelta(hours=2)) is None
        day_id = next(t.ticket_id for t in tickets if t.kind == "day_pass")
        assert [orders.record_use(conn, day_id, who="bus", at=NOW + timedelta(hours=h)) for h in (1, 2, 3)] == [1, 2, 3]
    assert sql(engine, "SELECT state FROM ticket_order WHERE order_id = :o", o=order_id)[0][0] == "issued"
    with engine.begin() as conn:  # the day is over: the pass is done, so is the order
        assert orders.expire_tickets(conn, now=NOW + timedelta(days=1)) == 1
    assert audit_trail(engine, order_id) == [(None, "created"), ("created", "paid"), ("paid", "issued"),
                                             ("issued", "used")]
    assert sql(engine, "SELECT COUNT(*) FROM order_audit WHERE order_id = :o AND who <> ''", o=order_id)[0][0] == 4


def test_the_last_seats_are_sold_once_and_an_unpaid_orders_seats_come_back_at_expiry(engine):
    dep = departure(engine, seats=3)
    first = buy(engine, [ItemRequest("coach", 2, departure_id=dep)])
    with pytest.raises(OrderError) as refused:
        buy(engine, [ItemRequest("coach", 2, departure_id=dep)])
    assert refused.value.code == "sold_out" and "1 seat(s) left" in refused.value.message
    assert sql(engine, "SELECT COUNT(*) FROM ticket_order")[0][0] == 1  # the refused order left nothing
    assert seat_books(engine, dep) == (3, 2, 2, 0)
    with engine.begin() as conn:
        assert orders.expire_unpaid(conn, now=NOW + timedelta(minutes=10)) == []  # still held
        assert orders.expire_unpaid(conn, now=NOW + timedelta(minutes=16)) == [first]
    assert seat_books(engine, dep) == (3, 0, 0, 0)
    assert audit_trail(engine, first) == [(None, "created"), ("created", "expired")]
    second = buy(engine, [ItemRequest("coach", 3, departure_id=dep)], now=NOW + timedelta(minutes=17))
    # the first order's payment comes late: its seats are gone, the money is due back, nothing is oversold
    result = pay(engine, first, "PAY-LATE", now=NOW + timedelta(minutes=18))
    assert result.outcome == "refund_due" and result.state == "expired"
    with engine.connect() as conn:
        assert orders.refund_due(conn, first) == 6000
    assert seat_books(engine, dep) == (3, 3, 3, 0)
    pay(engine, second, "PAY-2", now=NOW + timedelta(minutes=19))
    issue(engine, second, now=NOW + timedelta(minutes=19))
    assert seat_books(engine, dep) == (3, 3, 3, 3)
    with pytest.raises(OrderError) as departed:
        buy(engine, [ItemRequest("coach", 1, departure_id=dep)], now=NOW + timedelta(hours=9))
    assert departed.value.code in ("departed", "sold_out")


def test_a_late_payment_takes_the_seats_again_when_they_are_free(engine):
    dep = departure(engine, seats=2)
    order_id = buy(engine, [ItemRequest("coach", 2, departure_id=dep)])
    with engine.begin() as conn:
        orders.expire_unpaid(conn, now=NOW + timedelta(minutes=20))
    assert pay(engine, order_id, "PAY-L", now=NOW + timedelta(minutes=21)).outcome == "revived"
    assert seat_books(engine, dep) == (2, 2, 2, 0)
    assert len(issue(engine, order_id, now=NOW + timedelta(minutes=22))) == 2
    assert seat_books(engine, dep) == (2, 2, 2, 2)
    assert audit_trail(engine, order_id)[-2:] == [("expired", "paid"), ("paid", "issued")]


def test_paid_twice_records_one_payment(engine):
    order_id = buy(engine, [ItemRequest("ride")])
    assert pay(engine, order_id, "PAY-9").outcome == "paid"  # the notification
    assert pay(engine, order_id, "PAY-9").outcome == "already_paid"  # the order query
    assert pay(engine, order_id, "PAY-OTHER").outcome == "second_payment"  # another payment: refund it, not here
    with pytest.raises(OrderError) as wrong:
        pay(engine, buy(engine, [ItemRequest("ride")]), "PAY-10", amount=199)
    assert wrong.value.code == "amount_mismatch"
    assert sql(engine, "SELECT paid_fen, payment_ref FROM ticket_order WHERE order_id = :o", o=order_id) == [
        (200, "PAY-9")]
    assert audit_trail(engine, order_id) == [(None, "created"), ("created", "paid")]


def test_the_same_idempotency_key_gives_the_same_order(engine):
    dep = departure(engine, seats=5)
    a = buy(engine, [ItemRequest("coach", 2, departure_id=dep)], key="app-123")
    b = buy(engine, [ItemRequest("coach", 2, departure_id=dep)], key="app-123")
    assert a == b and seat_books(engine, dep) == (5, 2, 2, 0)


def test_only_unused_tickets_are_refunded(engine):
    dep = departure(engine, seats=4)
    order_id = buy(engine, [ItemRequest("coach", 2, departure_id=dep), ItemRequest("ride")])
    pay(engine, order_id, "PAY-R")
    tickets = issue(engine, order_id)
    coach = [t.ticket_id for t in tickets if t.kind == "coach_trip"]
    ride = next(t.ticket_id for t in tickets if t.kind == "single")
    at = NOW + timedelta(hours=1)
    with engine.begin() as conn:
        assert orders.record_use(conn, ride, who="bus", at=at) == 1
        quote = orders.refund_quote(conn, order_id, now=at)
    assert sorted(quote.tickets) == sorted(coach) and quote.amount_fen == 6000 and ride in quote.refused
    with engine.begin() as conn:
        done = orders.refund(conn, order_id, ticket_ids=[coach[0], ride], who="staff:li", why="rider asked", now=at)
    assert done.tickets == [coach[0]] and done.amount_fen == 3000 and "used" in done.refused[ride]
    assert seat_books(engine, dep) == (4, 1, 1, 1)
    with engine.begin() as conn:
        orders.refund(conn, order_id, who="staff:li", why="rider asked", now=at)
        with pytest.raises(OrderError) as nothing:
            orders.refund(conn, order_id, who="staff:li", why="again", now=at)
    assert nothing.value.code == "not_refundable"
    assert seat_books(engine, dep) == (4, 0, 0, 0)
    with engine.connect() as conn:  # the refunded tokens still verify: the buses get their ids to refuse
        assert orders.denied_tickets(conn, OP, now=at) == sorted(coach)
        assert orders.denied_tickets(conn, OP, now=NOW + timedelta(days=2)) == []
    params = KEYS.validator_params(OP, sorted(coach))
    assert params.denied == frozenset(coach) and params.pickup_key == KEYS.pickup_key(OP)
    from wire.ticket import TicketParams, decode_ticket

    assert TicketParams.from_dict(params.to_dict()) == params
    assert decode_ticket(tickets[0].token, params.public_keys).ticket_id == tickets[0].ticket_id
    assert sql(engine, "SELECT state, refunded_fen FROM ticket_order WHERE order_id = :o", o=order_id) == [
        ("used", 6000)]
    assert sql(engine, "SELECT state, COUNT(*) FROM ticket WHERE order_id = :o GROUP BY state ORDER BY state",
               o=order_id) == [("refunded", 2), ("used", 1)]
    assert audit_trail(engine, order_id)[-2:] == [("issued", "issued"), ("issued", "used")]


def test_a_paid_order_never_issued_is_refunded_whole_and_its_seats_come_back(engine):
    dep = departure(engine, seats=2)
    order_id = buy(engine, [ItemRequest("coach", 2, departure_id=dep)])
    pay(engine, order_id, "PAY-W")
    with engine.begin() as conn:
        quote = orders.refund(conn, order_id, who="staff", why="could not issue")
    assert quote.whole_payment and quote.amount_fen == 6000
    assert seat_books(engine, dep) == (2, 0, 0, 0)
    assert audit_trail(engine, order_id)[-1] == ("paid", "refunded")


# ----------------------------------------------------------------------------------- PostgreSQL, many at once
@pytest.fixture
def pg_engine(pg_schema_url):
    engine = make_engine(pg_schema_url)
    upgrade(engine)
    with engine.begin() as conn:
        registry.add_operator(conn, code=OP, name="Coach Co", at=NOW - timedelta(days=30))
        registry.add_route(conn, code="C1", operator=OP, name="City - Airport", flat_fare=200,
                           at=NOW - timedelta(days=30))
        catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Airport coach",
                              price_fen=3000, by="clerk", now=NOW)
    yield engine
    engine.dispose()


def _race(n: int, work) -> list:
    """Run ``work(i)`` in n threads that start together; their results (or exceptions)."""
    start = threading.Barrier(n)
    results: list = [None] * n

    def run(i):
        start.wait()
        try:
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001 - the test looks at each one
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_many_buyers_at_once_never_oversell_the_last_seats(pg_engine):
    dep = departure(pg_engine, seats=7)
    buyers = 24
    results = _race(buyers, lambda i: buy(pg_engine, [ItemRequest("coach", 1 + i % 2, departure_id=dep)],
                                          phone=f"1380000{i:04d}"))
    won = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, OrderError)]
    assert len(won) + len(refused) == buyers, [r for r in results if not isinstance(r, (str, OrderError))]
    assert all(r.code == "sold_out" for r in refused)
    seats, taken, held, _ = seat_books(pg_engine, dep)
    (asked,), = sql(pg_engine, "SELECT COALESCE(SUM(i.quantity), 0) FROM order_item i JOIN ticket_order o "
                               "ON o.order_id = i.order_id WHERE i.departure_id = :d", d=dep)
    assert taken == held == asked <= seats == 7
    assert taken >= 6  # a buyer of 1 would have fitted otherwise: the last seats went
    # all pay and issue at once: exactly the seats held become tickets
    _race(len(won), lambda i: (pay(pg_engine, won[i], f"P-{i}"), issue(pg_engine, won[i])))
    assert seat_books(pg_engine, dep) == (7, taken, taken, taken)


def test_a_notification_and_a_query_at_once_pay_once(pg_engine):
    dep = departure(pg_engine, seats=40)
    order_ids = [buy(pg_engine, [ItemRequest("coach", 1, departure_id=dep)], phone="13800000001") for _ in range(5)]
    outcomes = _race(20, lambda i: pay(pg_engine, order_ids[i % 5], f"REF-{i % 5}").outcome)
    assert sorted(outcomes) == ["already_paid"] * 15 + ["paid"] * 5
    assert sql(pg_engine, "SELECT COUNT(*) FROM order_audit WHERE to_state = 'paid'")[0][0] == 5
    assert sql(pg_engine, "SELECT SUM(paid_fen) FROM ticket_order")[0][0] == 5 * 3000
    # issue and expiry racing a payment: each order ends either paid (and issued) or expired, never both
    late = [buy(pg_engine, [ItemRequest("coach", 1, departure_id=dep)], phone="13800000002") for _ in range(6)]

    def work(i):
        if i % 2:
            return pay(pg_engine, late[i // 2], f"LATE-{i // 2}", now=NOW + timedelta(minutes=30)).outcome
        with pg_engine.begin() as conn:
            return orders.expire_unpaid(conn, now=NOW + timedelta(minutes=30))

    _race(12, work)
    for order_id in late:
        trail = audit_trail(pg_engine, order_id)
        assert trail[0] == (None, "created") and len(trail) in (2, 3), trail
    assert seat_books(pg_engine, dep)[1] == seat_books(pg_engine, dep)[2]


def test_a_quote_holds_nothing_and_the_expiry_job_releases_seats(engine):
    from backoffice.tickets import jobs

    dep = departure(engine, seats=2)
    with engine.connect() as conn:
        quote = orders.quote_order(conn, operator=OP, items=[ItemRequest("coach", 2, departure_id=dep),
                                                              ItemRequest("ride")], now=NOW)
    assert quote.total_fen == 2 * 3000 + 200 and quote.enough and quote.lines[0]["seats_free"] == 2
    assert seat_books(engine, dep) == (2, 0, 0, 0)
    held = buy(engine, [ItemRequest("coach", 2, departure_id=dep)])
    with engine.connect() as conn:
        assert not orders.quote_order(conn, operator=OP, items=[ItemRequest("coach", 1, departure_id=dep)],
                                      now=NOW).enough
    done = jobs.expire_due(engine, now=NOW + timedelta(hours=1))
    assert done.orders_expired == [held] and seat_books(engine, dep) == (2, 0, 0, 0)
    assert jobs.expire_due(engine, now=NOW + timedelta(hours=1)).orders_expired == []


def test_a_pickup_code_redeemed_at_the_counter_counts_as_the_use(engine):
    from wire.ticket import TicketError

    order_id = buy(engine, [ItemRequest("ride")], phone="138-0013-8000")
    pay(engine, order_id, "PAY-P")
    (ticket,) = issue(engine, order_id)
    at = NOW + timedelta(hours=1)
    with engine.begin() as conn:
        assert orders.orders_of_phone(conn, operator=OP, phone="13800138000") == [order_id]
        with pytest.raises(TicketError):  # one digit off: the check digits say so
            wrong = ticket.pickup_code[:-1] + str((int(ticket.pickup_code[-1]) + 1) % 10)
            orders.use_by_pickup_code(conn, operator=OP, code=wrong, keys=KEYS, who="counter", at=at)
        assert orders.use_by_pickup_code(conn, operator=OP, code=ticket.pickup_code, keys=KEYS, who="counter",
                                         at=at) == (ticket.ticket_id, 1)
        with pytest.raises(OrderError) as again:
            orders.use_by_pickup_code(conn, operator=OP, code=ticket.pickup_code, keys=KEYS, who="counter", at=at)
    assert again.value.code == "used_up"
    assert sql(engine, "SELECT uses_made, state FROM ticket WHERE ticket_id = :t", t=ticket.ticket_id) == [(1, "used")]
    assert audit_trail(engine, order_id)[-1] == ("issued", "used")


def test_baskets_of_two_coaches_in_either_order_never_deadlock_nor_oversell(pg_engine):
    a, b = departure(pg_engine, seats=6, departs="17:00"), departure(pg_engine, seats=6, departs="19:00")

    def basket(i):
        first, second = (a, b) if i % 2 else (b, a)
        return buy(pg_engine, [ItemRequest("coach", 1, departure_id=first), ItemRequest("coach", 1,
                                                                                          departure_id=second)],
                   phone=f"1390000{i:04d}")

    results = _race(16, basket)
    assert all(isinstance(r, str) or (isinstance(r, OrderError) and r.code == "sold_out") for r in results), results
    assert sum(isinstance(r, str) for r in results) == 6
    assert seat_books(pg_engine, a)[:3] == seat_books(pg_engine, b)[:3] == (6, 6, 6)


def test_the_same_idempotency_key_at_once_makes_one_order(pg_engine):
    """Many requests with one idempotency key at once (a shop's retry racing the first): one order, one hold, the
    same id for all; nobody gets an error (it was a foreign-key error before ON CONFLICT ... RETURNING)."""
    dep = departure(pg_engine, seats=40)
    results = _race(12, lambda i: buy(pg_engine, [ItemRequest("coach", 2, departure_id=dep)], key="same-key-1"))
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 1
    assert sql(pg_engine, "SELECT COUNT(*) FROM ticket_order WHERE idempotency_key = 'same-key-1'")[0][0] == 1
    assert seat_books(pg_engine, dep)[1:3] == (2, 2)


def test_insert_or_nothing_tells_whether_it_inserted(engine):
    """``_insert_or_nothing`` reads rowcount after INSERT ... ON CONFLICT DO NOTHING: 1 inserted, 0 skipped, on
    both databases (checked with plain SQL)."""
    from backoffice.models import OrderAudit, TicketOrder

    row = dict(order_id="TKX1", operator=OP, channel="web", phone="13800138000", state="created", total_fen=1,
               paid_fen=0, refunded_fen=0, idempotency_key="k1", created_at=NOW, updated_at=NOW, expires_at=NOW)
    with engine.begin() as conn:
        assert orders._insert_or_nothing(conn, TicketOrder, row) is True
        assert orders._insert_or_nothing(conn, TicketOrder, row) is False  # same primary key
        assert orders._insert_or_nothing(conn, TicketOrder, row | {"order_id": "TKX2"}) is False  # same key
        assert orders._insert_or_nothing(conn, OrderAudit, dict(order_id="TKX1", at=NOW, who="t", to_state="x",
                                                                why="")) is True
    assert sql(engine, "SELECT order_id FROM ticket_order WHERE order_id LIKE 'TKX%'") == [("TKX1",)]


def test_counter_uses_are_cleared_on_the_tickets_one_route_or_the_station_counter_line(engine):
    """A pickup code redeemed at a station counter (backoffice.tickets.redeem, the use case the counter page and API
    call) is a use on no bus: a coach ticket (one route) lands on its route, a ride of any route and a pass of two
    routes on the "station counter" line; the station is the use's vehicle. The day's clearing run shows them so
    (its route rows checked against plain SQL over ticket_use)."""
    from backoffice import clearing_runs as cr
    from backoffice.tickets import redeem
    from clearing.tickets import COUNTER_ROUTE

    dep = departure(engine, seats=5, departs="18:30")  # 10:30 UTC; the ticket is good from 09:30 UTC
    tickets = {}
    for name, item in (("coach", ItemRequest("coach", 1, departure_id=dep)), ("ride", ItemRequest("ride")),
                       ("day", ItemRequest("day"))):
        order_id = buy(engine, [item])
        pay(engine, order_id, f"PAY-{name}")
        (tickets[name],) = issue(engine, order_id)
    at = NOW + timedelta(hours=8)  # 10:00 UTC, 18:00 local
    guard = redeem.Guard()
    for name in tickets:
        r = redeem.redeem(engine, operator=OP, code=tickets[name].pickup_code, keys=KEYS, staff="clerk1",
                          client="127.0.0.1", station="North Station", guard=guard, printer=None, now=at)
        assert r.use_no == 1
    got = {t: (route, vehicle, driver) for t, route, vehicle, driver in sql(
        engine, "SELECT ticket_id, route, vehicle, driver FROM ticket_use WHERE presented_by = 'counter'")}
    assert got == {tickets["coach"].ticket_id: ("C1", "North Station", ""),
                   tickets["ride"].ticket_id: (COUNTER_ROUTE, "North Station", ""),
                   tickets["day"].ticket_id: (COUNTER_ROUTE, "North Station", "")}
    with engine.begin() as conn:
        cr.set_commission_rate(conn, operator=OP, rate_bp=60, valid_from=date(2026, 1, 1))
        cr.clear_day(conn, operator=OP, day=DAY, now=NOW + timedelta(days=1))
    rows = {key: (int(taps), int(gross)) for key, taps, gross in sql(
        engine, "SELECT w.key, w.taps, w.gross FROM clearing_row w JOIN clearing_run r ON r.id = w.run_id "
                "WHERE r.operator = :op AND r.service_day = :d AND w.section = 'ticket' AND w.dimension = 'route'",
        op=OP, d=DAY)}
    # what each counter use earns: the coach and the ride their price, the day pass nothing per ride (spread)
    assert rows["C1"] == (1, 3000)
    assert rows[COUNTER_ROUTE] == (2, 200)
    assert all(key != "" or taps == 0 for key, (taps, _) in rows.items())  # no use on a blank route
