"""Ticket orders over time (hypothesis stateful, a SQLite file): buyers order coach seats, passes and rides, pay
(sometimes twice, sometimes late), get tickets, ride, ask for refunds, and the clock moves so holds and tickets expire.
After every step, plain SQL (sharing no code with backoffice.tickets) checks the books:

- no departure has more seats taken than it has, and its ``seats_taken`` is the seats of its live holds;
- every coach ticket not refunded sits on a sold hold (sold seats >= such tickets);
- an issued order has exactly as many tickets as its items ask; an order never issued has none;
- money: paid is 0 or the total; refunded never more than paid; refunded = the prices of refunded tickets (or the
  whole payment of an order never issued);
- every order's audit lines chain: the first is ``-> created``, each next one starts where the last ended, the last
  ends at the order's state.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import text

from backoffice import registry
from backoffice.db import make_engine, upgrade
from backoffice.tickets import catalogue, orders
from backoffice.tickets.keys import published_test_keys
from backoffice.tickets.orders import ItemRequest, OrderError

START = datetime(2026, 12, 3, 1, 0, tzinfo=UTC)
KEYS = published_test_keys()
OP = "coachco"


class TicketBooks(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.engine = make_engine(f"sqlite:///{self.dir.name}/bo.db")
        upgrade(self.engine)
        self.now = START
        self.refs = 0
        with self.engine.begin() as conn:
            registry.add_operator(conn, code=OP, name="Coach Co", at=START - timedelta(days=9))
            registry.add_route(conn, code="C1", operator=OP, name="Airport", flat_fare=200,
                               at=START - timedelta(days=9))
            catalogue.add_product(conn, operator=OP, code="coach", kind="coach_trip", name="Coach", price_fen=3000,
                                  by="t", now=START)
            catalogue.add_product(conn, operator=OP, code="ride", kind="single", name="Ride", price_fen=200,
                                  by="t", now=START)
            catalogue.add_product(conn, operator=OP, code="day", kind="day_pass", name="Day", price_fen=1500,
                                  by="t", now=START)
            self.departures = [catalogue.add_departure(conn, operator=OP, product="coach", route="C1",
                                                       service_date=START.date(), departs=t, seats=s).id
                               for t, s in (("12:00", 3), ("20:00", 5))]
        self.orders: list[str] = []

    def teardown(self):
        self.engine.dispose()
        self.dir.cleanup()

    def sql(self, query, **params):
        with self.engine.connect() as conn:
            return conn.execute(text(query), params).all()

    # ------------------------------------------------------------------------------------------------ steps
    @rule(coach=st.integers(0, 3), dep=st.integers(0, 1), rides=st.integers(0, 2), day=st.booleans())
    def buy(self, coach, dep, rides, day):
        items = ([ItemRequest("coach", coach, departure_id=self.departures[dep])] if coach else []) + (
            [ItemRequest("ride", rides)] if rides else []) + ([ItemRequest("day")] if day else [])
        if not items:
            return
        try:
            with self.engine.begin() as conn:
                self.orders.append(orders.create_order(conn, operator=OP, channel="web", phone="13800138000",
                                                       items=items, who="rider", now=self.now))
        except OrderError as e:
            assert e.code in ("sold_out", "departed")

    @precondition(lambda self: self.orders)
    @rule(pick=st.integers(0, 10**6), twice=st.booleans(), other_ref=st.booleans())
    def pay(self, pick, twice, other_ref):
        order_id = self.orders[pick % len(self.orders)]
        (total, state), = self.sql("SELECT total_fen, state FROM ticket_order WHERE order_id = :o", o=order_id)
        self.refs += 1
        for ref in [f"R{self.refs}"] * (2 if twice else 1) + ([f"X{self.refs}"] if other_ref else []):
            with self.engine.begin() as conn:
                try:
                    orders.mark_paid(conn, order_id, amount_fen=total, payment_ref=ref, who="platform", now=self.now)
                except OrderError as e:
                    assert e.code == "bad_state" and state not in ("created", "expired")

    @precondition(lambda self: self.orders)
    @rule(pick=st.integers(0, 10**6))
    def issue(self, pick):
        order_id = self.orders[pick % len(self.orders)]
        with self.engine.begin() as conn:
            try:
                orders.issue_tickets(conn, order_id, keys=KEYS, who="shop", now=self.now)
            except OrderError as e:
                assert e.code == "not_paid"

    @precondition(lambda self: self.orders)
    @rule(pick=st.integers(0, 10**6))
    def ride(self, pick):
        rows = self.sql("SELECT ticket_id FROM ticket ORDER BY ticket_id")
        if rows:
            with self.engine.begin() as conn:
                orders.record_use(conn, rows[pick % len(rows)][0], who="bus", at=self.now)

    @precondition(lambda self: self.orders)
    @rule(pick=st.integers(0, 10**6), one=st.booleans())
    def refund(self, pick, one):
        order_id = self.orders[pick % len(self.orders)]
        tickets = [r[0] for r in self.sql("SELECT ticket_id FROM ticket WHERE order_id = :o", o=order_id)]
        with self.engine.begin() as conn:
            try:
                orders.refund(conn, order_id, who="staff", why="asked", now=self.now,
                              ticket_ids=tickets[:1] if one and tickets else None)
            except OrderError as e:
                assert e.code == "not_refundable"

    @rule(minutes=st.sampled_from([1, 7, 16, 60, 600]))
    def time_passes(self, minutes):
        self.now += timedelta(minutes=minutes)
        with self.engine.begin() as conn:
            orders.expire_unpaid(conn, now=self.now)
            orders.expire_tickets(conn, now=self.now)

    # ------------------------------------------------------------------------------------------- the books
    @invariant()
    def seats_add_up(self):
        for dep_id, seats, taken, live, sold, coach_tickets in self.sql(
                "SELECT d.id, d.seats, d.seats_taken, "
                " (SELECT COALESCE(SUM(h.seats), 0) FROM seat_hold h WHERE h.departure_id = d.id "
                "  AND h.state IN ('held', 'sold')), "
                " (SELECT COALESCE(SUM(h.seats), 0) FROM seat_hold h WHERE h.departure_id = d.id "
                "  AND h.state = 'sold'), "
                " (SELECT COUNT(*) FROM ticket t WHERE t.departure_id = d.id AND t.state <> 'refunded') "
                "FROM departure d"):
            assert 0 <= taken <= seats and taken == live, (dep_id, seats, taken, live)
            assert coach_tickets <= sold, (dep_id, coach_tickets, sold)

    @invariant()
    def tickets_and_money_add_up(self):
        for order_id, state, total, paid, refunded, issued_at, asked, made, refunded_prices in self.sql(
                "SELECT o.order_id, o.state, o.total_fen, o.paid_fen, o.refunded_fen, o.issued_at, "
                " (SELECT SUM(quantity) FROM order_item i WHERE i.order_id = o.order_id), "
                " (SELECT COUNT(*) FROM ticket t WHERE t.order_id = o.order_id), "
                " (SELECT COALESCE(SUM(price_fen), 0) FROM ticket t WHERE t.order_id = o.order_id "
                "  AND t.state = 'refunded') "
                "FROM ticket_order o"):
            assert made == (asked if issued_at is not None else 0), (order_id, state, asked, made)
            assert paid in (0, total) and 0 <= refunded <= paid, (order_id, paid, refunded)
            if issued_at is not None:
                assert refunded == refunded_prices, (order_id, refunded, refunded_prices)
            else:
                assert refunded in (0, paid)

    @invariant()
    def every_change_has_its_audit_line(self):
        trail: dict[str, list] = {}
        for order_id, from_state, to_state in self.sql(
                "SELECT order_id, from_state, to_state FROM order_audit ORDER BY id"):
            trail.setdefault(order_id, []).append((from_state, to_state))
        for order_id, state in self.sql("SELECT order_id, state FROM ticket_order"):
            lines = trail[order_id]
            assert lines[0] == (None, "created")
            for (_, before), (after, _) in zip(lines, lines[1:]):
                assert before == after, (order_id, lines)
            assert lines[-1][1] == state, (order_id, lines, state)


TicketBooks.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
test_ticket_books = pytest.mark.filterwarnings("ignore")(TicketBooks.TestCase)
