"""The over-the-air host against a phone that lies, on SQLite and PostgreSQL: whatever the phone relays, no card
gains more than was paid for it, and a refused request changes nothing.

The checks read the simulated SIM (its balance and its own full transaction history), never farebox's view of it:
a load the card made must never be recorded void (that would free its order for another MAC2), and the card's
gain is at most what the platform was paid."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import func, select, text
from test_topup import (DESK, KEYS, OPENING, OTA_TERMINAL, Clock, Direct, engine, issued_card,  # noqa: F401
                        loaded_total, new_order, order_status, world)

from backoffice.cards import cases, topup
from backoffice.cards.ota_host import OtaHost
from backoffice.models import CardLoad, TopupOrder
from epurse import apdu
from hardware_sim.payment import PaymentPlatform
from hardware_sim.phone import HostTimeout, LyingPhone, Phone, PhoneGone


def pay(host, platform, order, amount):
    hook = platform.pay(order, amount)
    host.payment_webhook(hook.body, hook.signature)


def card_loads(card) -> list:
    """Every load the SIM made, from its own history (newest first)."""
    return [t for t in card.log if t.tx_type == apdu.TX_LOAD]


def recorded_void(engine, asn) -> set[int]:
    """Online counters at which farebox recorded a load void."""
    with engine.connect() as conn:
        return set(conn.execute(select(CardLoad.online_ttc).where(CardLoad.asn == asn, CardLoad.status == "void")
                                ).scalars())


def no_load_the_card_made_is_void(engine, card):
    made = {(t.ttc, t.mac2.hex()) for t in card_loads(card)}  # the MAC2 the card accepted names the load
    with engine.connect() as conn:
        voids = conn.execute(select(CardLoad.online_ttc, CardLoad.mac2)
                             .where(CardLoad.asn == card.asn.hex(), CardLoad.status == "void")).all()
    wrongly = [v for v in voids if tuple(v) in made]
    assert not wrongly, f"loads the card made are recorded void: {wrongly}"


def snapshot(engine) -> dict:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT * FROM {t} ORDER BY 1")).all()
                for t in ("card_load", "topup_order", "card_case", "card_audit")}


def test_a_phone_that_shows_its_old_counter_gets_one_load_for_one_payment(world):
    """The hole: MAC2, CREDIT, no TAC, then 'seen' with the counter from before the load, four rounds."""
    engine, clock, platform, host, card, _phone = world
    liar = LyingPhone(card, host, OTA_TERMINAL)
    order = new_order(engine, clock, card.asn.hex(), 1000)
    pay(host, platform, order, 1000)
    liar.topup(order, 1000)
    assert card.balance == OPENING + 1000
    for _ in range(4):
        clock.tick(60)
        settled = liar.show_card()  # the SIM as it was before the load: counter t, no load in its log
        assert set(settled.values()) <= {"authorized"}, settled  # nothing concluded from a phone's word
        assert order_status(engine, order) in ("authorized", "unconfirmed")
        with pytest.raises(topup.TopupRefused) as again:
            liar.topup(order, 1000)  # a real INITIALIZE now: the card's MAC1 shows the counter moved on
        assert again.value.reason == "load_unconfirmed"
        grant = liar.replay(order, 0)  # the genuine answer captured before the load: a MAC2 at the old counter
        assert card.transmit(grant.credit_apdu())[-2:] != b"\x90\x00"  # useless: the card's session is gone
    assert card.balance == OPENING + 1000
    assert order_status(engine, order) == "unconfirmed"
    no_load_the_card_made_is_void(engine, card)
    # The honest phone comes back with the card's proof: the load is settled, once.
    assert set(Phone(card, host, OTA_TERMINAL).show_card().values()) == {"loaded"}
    assert order_status(engine, order) == "loaded" and loaded_total(engine, card.asn.hex()) == 1000


def test_a_forged_initialize_with_an_empty_log_is_refused_and_changes_nothing(world):
    engine, clock, platform, host, card, phone = world
    order = new_order(engine, clock, card.asn.hex(), 1000)
    pay(host, platform, order, 1000)
    phone.vanish_after_credit = True
    with pytest.raises(PhoneGone):
        phone.topup(order, 1000)
    t = card.online_ttc - 1
    before = snapshot(engine)
    # balance(4) online TTC(2) key version algorithm random(4) MAC1(4): the counter before the load, a made-up MAC1
    forged = OPENING.to_bytes(4, "big") + t.to_bytes(2, "big") + b"\x01\x00" + bytes(4) + b"\xde\xad\xbe\xef"
    with pytest.raises(topup.TopupRefused) as refused:
        host.authorize(order_id=order, asn=card.asn.hex(), init_answer=forged, terminal_id=OTA_TERMINAL, log=[])
    assert refused.value.reason == "bad_mac1"
    assert snapshot(engine) == before
    assert order_status(engine, order) == "authorized" and card.balance == OPENING + 1000


def test_a_forged_log_never_voids_and_a_proof_settles(world):
    """A phone claims the counter moved because of some other load (a made-up log record at t): not a void."""
    engine, clock, platform, host, card, phone = world
    order = new_order(engine, clock, card.asn.hex(), 1500)
    pay(host, platform, order, 1500)
    phone.vanish_after_credit = True
    with pytest.raises(PhoneGone):
        phone.topup(order, 1500)
    t = card.online_ttc - 1
    other = (t.to_bytes(2, "big") + bytes(3) + (1).to_bytes(4, "big") + bytes([apdu.TX_LOAD]) + OTA_TERMINAL
             + bytes.fromhex("20261122") + bytes.fromhex("090000"))
    assert set(host.card_seen(asn=card.asn.hex(), online_ttc=t + 1, log=[other]).values()) == {"unconfirmed"}
    assert recorded_void(engine, card.asn.hex()) == set()
    with pytest.raises(topup.TopupRefused):  # a made-up proof is no proof
        host.card_seen(asn=card.asn.hex(), online_ttc=t + 1, log=[], proofs=[(t, bytes(7))])
    assert set(host.card_seen(asn=card.asn.hex(), online_ttc=t + 1, log=[], proofs=[(t, bytes(8))]).values()) \
        == {"unconfirmed"}
    assert order_status(engine, order) == "unconfirmed"
    # Its SIM's answer to GET TRANSACTION PROVE, relayed without a log: settled.
    answer = card.transmit(apdu.get_transaction_prove(apdu.TX_LOAD, t))
    assert host.card_seen(asn=card.asn.hex(), online_ttc=card.online_ttc, log=[], proofs=[(t, answer[:-2])]) \
        .popitem()[1] == "loaded"
    assert order_status(engine, order) == "loaded" and card.balance == OPENING + 1500


def test_two_orders_at_one_counter_load_at_most_once_and_the_proof_frees_the_other(world):
    engine, clock, platform, host, card, phone = world
    first, second = (new_order(engine, clock, card.asn.hex(), 800) for _ in range(2))
    pay(host, platform, first, 800)
    pay(host, platform, second, 800)
    phone.lose_answer = True  # the first order's MAC2 is lost on the way; the rider picks the other order
    with pytest.raises(HostTimeout):
        phone.topup(first, 800)
    assert phone.topup(second, 800).status == "loaded"
    assert order_status(engine, first) == "paid"  # the second's TAC proves the counter spent: the first is free
    assert phone.topup(first, 800).status == "loaded"
    assert card.balance == OPENING + 1600 and loaded_total(engine, card.asn.hex()) == 1600
    no_load_the_card_made_is_void(engine, card)


def test_a_phone_that_starts_over_without_its_log_gets_a_second_mac2_at_the_same_counter(world):
    """Kills the mutation `init.online_ttc > counter` -> `>=`: starting over at the same counter is allowed."""
    engine, clock, platform, host, card, phone = world
    order = new_order(engine, clock, card.asn.hex(), 600)
    pay(host, platform, order, 600)
    phone.send_log = False
    phone.lose_answer = True
    with pytest.raises(HostTimeout):
        phone.topup(order, 600)
    clock.tick(30)
    assert phone.topup(order, 600).status == "loaded"
    with engine.connect() as conn:
        rows = conn.execute(select(CardLoad.status, CardLoad.online_ttc).where(CardLoad.order_id == order)
                            .order_by(CardLoad.id)).all()
    assert [tuple(r) for r in rows] == [("void", 0), ("loaded", 0)]
    assert card.balance == OPENING + 600
    with engine.connect() as conn:  # starting over is no sign of trouble: no case for staff
        assert cases.open_cases(conn, asn=card.asn.hex()) == []


def test_a_replayed_initialize_for_another_order_voids_nothing(world):
    """The phone loads order X and keeps the TAC, then relays the same (genuine) INITIALIZE answer for order Y: a
    MAC2 at the old counter for Y is harmless, but X must stay open, or X could be loaded a second time."""
    engine, clock, platform, host, card, _phone = world
    liar = LyingPhone(card, host, OTA_TERMINAL)
    x, y = new_order(engine, clock, card.asn.hex(), 5000), new_order(engine, clock, card.asn.hex(), 5000)
    pay(host, platform, x, 5000)
    pay(host, platform, y, 5000)
    liar.topup(x, 5000)
    clock.tick(5)
    grant = liar.replay(y, 0)
    assert card.transmit(grant.credit_apdu())[-2:] != b"\x90\x00"
    assert order_status(engine, x) == "authorized"
    with pytest.raises(topup.TopupRefused) as again:
        liar.topup(x, 5000)
    assert again.value.reason == "load_unconfirmed"
    assert card.balance == OPENING + 5000
    no_load_the_card_made_is_void(engine, card)


def test_the_desk_reader_settles_a_vanished_phone_load_as_loaded_and_an_unused_one_as_void(world):
    """The counter channel is a witness: a load whose counter the card passed is settled from the log read at the
    desk (kills `row.online_ttc == online_ttc` -> `<=` there), one at the card's counter now is void."""
    engine, clock, platform, host, card, phone = world
    used, unused = new_order(engine, clock, card.asn.hex(), 400), new_order(engine, clock, card.asn.hex(), 500)
    pay(host, platform, used, 400)
    pay(host, platform, unused, 500)
    phone.vanish_after_credit = True
    with pytest.raises(PhoneGone):
        phone.topup(used, 400)
    phone.lose_answer = True
    with pytest.raises(HostTimeout):
        phone.topup(unused, 500)
    clock.tick(60)
    topup.counter_topup(engine, Direct(card), keys=KEYS, amount=100, terminal_id=DESK, staff="staff:li",
                        now=clock())
    assert (order_status(engine, used), order_status(engine, unused)) == ("loaded", "paid")
    assert card.balance == OPENING + 500 and loaded_total(engine, card.asn.hex()) == 500
    no_load_the_card_made_is_void(engine, card)


# --- a stateful attacker ------------------------------------------------------------------------------------


class LyingPhoneMachine(RuleBasedStateMachine):
    """Orders paid, honest and lying phones, lost answers, vanished phones, replays, desk top-ups and staff, in any
    order. After every step: the card gained at most what was paid and loaded at the desk, no load the card made
    is recorded void, and every order the card loaded is recorded loaded or waits for staff (never paid/refunded)."""

    engine = None  # set by the test

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM card_audit"))
            for table in ("card_case", "card_load", "payment_event", "topup_order", "card_entry", "card_account",
                          "card"):
                conn.execute(text(f"DELETE FROM {table}"))
        self.platform = PaymentPlatform(clock=self.clock)
        self.host = OtaHost(self.engine, KEYS, webhook_key=self.platform.public_key, clock=self.clock)
        self.card = issued_card(self.engine, self.tmp, self.clock)
        self.card.state_file = None  # keep its whole history in memory: the checks read it
        self.honest = Phone(self.card, self.host, OTA_TERMINAL)
        self.liar = LyingPhone(self.card, self.host, OTA_TERMINAL)
        self.orders: list[tuple[str, int]] = []
        self.paid = 0
        self.desk = 0

    def _try(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (topup.TopupRefused, HostTimeout, PhoneGone, apdu.StatusError):
            return None

    @rule(amount=st.sampled_from([100, 700, 5000]))
    def new_paid_order(self, amount):
        order = new_order(self.engine, self.clock, self.card.asn.hex(), amount)
        pay(self.host, self.platform, order, amount)
        self.orders.append((order, amount))
        self.paid += amount

    @precondition(lambda self: self.orders)
    @rule(i=st.integers(0, 50), fault=st.sampled_from(["none", "lose", "vanish", "nolog"]))
    def honest_topup(self, i, fault):
        order, amount = self.orders[i % len(self.orders)]
        self.honest.lose_answer = fault == "lose"
        self.honest.vanish_after_credit = fault == "vanish"
        self.honest.send_log = fault != "nolog"
        self._try(self.honest.topup, order, amount)
        self.honest.lose_answer = self.honest.vanish_after_credit = False

    @precondition(lambda self: self.orders)
    @rule(i=st.integers(0, 50))
    def lying_topup(self, i):
        order, amount = self.orders[i % len(self.orders)]
        self._try(self.liar.topup, order, amount)

    @precondition(lambda self: self.liar.before is not None)
    @rule()
    def lying_show_card(self):
        self._try(self.liar.show_card)

    @precondition(lambda self: self.liar.captured and self.orders)
    @rule(i=st.integers(0, 50), j=st.integers(0, 50))
    def lying_replay_and_credit(self, i, j):
        order, _amount = self.orders[i % len(self.orders)]
        grant = self._try(self.liar.replay, order, j % len(self.liar.captured))
        if grant is not None:
            self.card.transmit(grant.credit_apdu())

    @rule()
    def honest_show_card(self):
        self._try(self.honest.show_card)

    @rule()
    def desk_topup(self):
        self.clock.tick(1)
        if self._try(topup.counter_topup, self.engine, Direct(self.card), keys=KEYS, amount=200,
                     terminal_id=DESK, staff="staff:li", now=self.clock()) is not None:
            self.desk += 200

    @precondition(lambda self: self.orders)
    @rule(i=st.integers(0, 50))
    def staff_retry_or_refund(self, i):
        order, _amount = self.orders[i % len(self.orders)]
        with self.engine.connect() as conn:  # staff read the card's counter at the desk, from the card itself
            with conn.begin():
                self._try(topup.staff_retry, conn, order_id=order, card_online_ttc=self.card.online_ttc,
                          who="staff:li", why="card at the desk", now=self.clock())
            with conn.begin():
                refunded = self._try(topup.refund_order, conn, order_id=order, who="staff:li", why="rider asks",
                                     now=self.clock())
        if refunded is not None:
            self.paid -= _amount

    @rule()
    def time_passes(self):
        self.clock.tick(600)

    @invariant()
    def nothing_free(self):
        gained = self.card.balance - OPENING
        assert gained <= self.paid + self.desk, (gained, self.paid, self.desk)
        no_load_the_card_made_is_void(self.engine, self.card)
        with self.engine.connect() as conn:
            statuses = dict(conn.execute(select(TopupOrder.order_id, TopupOrder.status)).all())
            made = {(t.ttc, t.mac2.hex()) for t in card_loads(self.card)}
            for row in conn.execute(select(CardLoad).where(CardLoad.order_id.is_not(None))).all():
                if (row.online_ttc, row.mac2) in made:
                    assert statuses[row.order_id] in ("loaded", "authorized", "unconfirmed"), row
            assert conn.execute(select(func.count()).select_from(CardLoad).where(
                CardLoad.status == "loaded").group_by(CardLoad.online_ttc).having(func.count() > 1)).first() is None


def test_a_stateful_attacker_never_gets_more_than_was_paid(engine, tmp_path):
    """12 examples of 30 steps in `make test`; FAREBOX_OTA_EXAMPLES=2000 (make soak) for the long run."""
    LyingPhoneMachine.engine, LyingPhoneMachine.tmp = engine, tmp_path
    run_state_machine_as_test(LyingPhoneMachine, settings=settings(
        max_examples=int(os.environ.get("FAREBOX_OTA_EXAMPLES", "12")), stateful_step_count=30, deadline=None,
        suppress_health_check=list(HealthCheck)))
