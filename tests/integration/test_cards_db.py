"""Cards and money stored in SQLite and PostgreSQL: revision 2026_11_22_0005 builds what the models describe and
upgrades from 0004; revision 0010 adds the card's counters at issue and downgrades back; issuance with proof,
and with the counters a simulated card reports (fresh, used before issue, or blocked and silent); loss
reporting freezes the balance; refunds never beyond it; adjustments; ledger anomalies from real tap rows raise
cases once (a lost first tap too, found by the counters at issue); closing a case can put the card on the deny
list; every change has its audit record."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import MetaData, delete, insert, select

from backoffice import models
from backoffice.cards import audit, cases, issuance, ledger, topup
from backoffice.db import alembic_config, make_engine, upgrade
from backoffice.denylist_publish import denied_asns
from backoffice.keyservice import LocalKeyService
from epurse import apdu, crypto
from epurse.keys import TEST_ISSUER_KEYS
from hardware_sim.card import SimCard
from hardware_sim.psam import SimPsam

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
KEYS = LocalKeyService(TEST_ISSUER_KEYS, source="test keys")
BUS = bytes.fromhex("010000000007")  # the bus validator's PSAM terminal number
DESK = bytes.fromhex("0E0000000002")  # the counter's terminal number for top-ups
MY_TABLES = ("card_account", "topup_order", "payment_event", "card_load", "card_entry", "card_case", "card_audit")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    return (f"sqlite:///{tmp_path}/bo.db" if request.param == "sqlite"
            else request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def engine(url):
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def facts(asn="41000000000000000001", card_type=1, balance=1000) -> issuance.CardFacts:
    return issuance.CardFacts(asn, "4650425800000001", card_type, 0, date(2026, 1, 1), date(2030, 1, 1), balance)


def test_the_revision_builds_what_the_models_describe(engine):
    reflected = MetaData()
    reflected.reflect(engine)
    for name in MY_TABLES:
        table, got = models.Base.metadata.tables[name], reflected.tables[name]
        assert set(got.columns.keys()) == set(table.columns.keys()), name
        for column in table.columns:
            assert got.columns[column.name].nullable == column.nullable, f"{name}.{column.name}"


def test_upgrade_from_0004_keeps_cards_and_downgrades_back(url):
    engine = make_engine(url)
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "2026_11_22_0004")
        conn.execute(insert(models.Card.__table__).values(asn="41000000000000000009", card_type=1, status="active"))
    upgrade(engine)
    with engine.begin() as conn:
        issuance.issue_card(conn, card=facts("41000000000000000009"), deposit=0, who="staff:li", now=NOW)
        assert conn.execute(select(models.CardAccount.asn)).scalars().all() == ["41000000000000000009"]
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "2026_11_22_0005-1")
    reflected = MetaData()
    reflected.reflect(engine)
    assert not set(MY_TABLES) & set(reflected.tables) and "card" in reflected.tables
    engine.dispose()


def test_revision_0010_adds_the_counters_at_issue_and_downgrades_back(url):
    engine = make_engine(url)
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "2026_11_22_0009")
        conn.execute(insert(models.Card.__table__).values(asn="41000000000000000008", card_type=1,
                                                          status="active"))
        conn.execute(insert(models.CardAccount.__table__).values(
            asn="41000000000000000008", algorithm=0, issuer="4650425800000001", valid_from=date(2026, 1, 1),
            valid_to=date(2030, 1, 1), deposit=0, opening_balance=500, issued_at=NOW, issued_by="staff:li"))
    upgrade(engine)
    account = models.CardAccount.__table__
    counters = select(account.c.asn, account.c.opening_purchase_ttc, account.c.opening_load_ttc) \
        .order_by(account.c.asn)
    with engine.begin() as conn:
        issuance.issue_card(conn, card=replace(facts("41000000000000000009"), purchase_ttc=4, load_ttc=1),
                            deposit=0, who="staff:li", now=NOW)
        assert [tuple(r) for r in conn.execute(counters)] == [
            ("41000000000000000008", None, None),  # issued before the revision: not known
            ("41000000000000000009", 4, 1)]
        # The card issued before: its ledger checks as it always did.
        conn.execute(insert(models.Tap.__table__), [_tap(1, 3, 200, 300, 1, asn="41000000000000000008")])
        assert ledger.card_ledger(conn, asn="41000000000000000008").findings == []
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "2026_11_22_0009")
    reflected = MetaData()
    reflected.reflect(engine)
    columns = set(reflected.tables["card_account"].columns.keys())
    assert not {"opening_purchase_ttc", "opening_load_ttc"} & columns and "opening_balance" in columns
    with engine.connect() as conn:  # the accounts themselves stay
        assert len(conn.execute(select(reflected.tables["card_account"].c.asn)).all()) == 2
    upgrade(engine)
    with engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(counters)] == [
            ("41000000000000000008", None, None), ("41000000000000000009", None, None)]
    engine.dispose()


class Direct:
    """A card session straight onto a SimCard (issuance reads the card as a desk reader would)."""

    def __init__(self, card):
        self.exchange = card.transmit


def sim_card(asn: str, balance: int = 1000, **kwargs) -> SimCard:
    return SimCard(bytes.fromhex(asn), 1, balance, start=date(2026, 1, 1), end=date(2030, 1, 1), **kwargs)


def opening_counters(engine, asn: str) -> tuple:
    account = models.CardAccount.__table__
    with engine.connect() as conn:
        return tuple(conn.execute(select(account.c.opening_purchase_ttc, account.c.opening_load_ttc)
                                  .where(account.c.asn == asn)).one())


def tap_on_bus(card: SimCard, psam: SimPsam, amount: int, when: datetime) -> int:
    """A purchase as a bus validator makes it (INITIALIZE, the PSAM's MAC1, DEBIT); returns the card's TTC."""
    apdu.check(card.transmit(apdu.select_aid()), "SELECT")
    init = apdu.parse_init_purchase(apdu.check(card.transmit(apdu.init_purchase(1, amount, BUS)), "INIT"))
    p = apdu.parse_psam_init_purchase(apdu.check(psam.transmit(apdu.psam_init_purchase(
        init.random, init.ttc, amount, apdu.TX_PURCHASE, when, init.key_version, init.algorithm, card.asn[2:],
        card.issuer)), "PSAM"))
    apdu.check(card.transmit(apdu.debit_purchase(p.terminal_seq, crypto.bcd_date(when), crypto.bcd_time(when),
                                                 p.mac1)), "DEBIT")
    return init.ttc


def test_issuing_a_simulated_card_stores_the_counters_it_reports(engine, caplog):
    fresh = sim_card("41000000000000000011")
    with engine.begin() as conn:
        issuance.issue_card(conn, card=issuance.read_card(Direct(fresh)), deposit=2000, who="staff:li",
                            now=NOW)
    assert opening_counters(engine, "41000000000000000011") == (fresh.ttc, fresh.online_ttc) == (0, 0)
    # Reading the counters completed nothing: the card is as it was, and a bus can debit it at once.
    assert (fresh.balance, fresh.log) == (1000, [])
    assert tap_on_bus(fresh, SimPsam(BUS), 200, NOW) == 0 and (fresh.ttc, fresh.balance) == (1, 800)

    # A card used before issue (factory tests, a card handed out again): 17 purchases and 4 loads, then one
    # more purchase on a bus. Issuance stores the counters the card has now, not zeros.
    used = sim_card("41000000000000000012", ttc=17, online_ttc=4)
    tap_on_bus(used, SimPsam(BUS), 150, NOW)
    with engine.begin() as conn:
        issuance.issue_card(conn, card=issuance.read_card(Direct(used)), deposit=2000, who="staff:li",
                            now=NOW)
    assert opening_counters(engine, "41000000000000000012") == (used.ttc, used.online_ttc) == (18, 4)
    # The purchase before issue is still provable on a bus (tearing recovery): the INITIALIZEs took nothing.
    apdu.check(used.transmit(apdu.select_aid()), "SELECT")
    apdu.check(used.transmit(apdu.get_transaction_prove(apdu.TX_PURCHASE, 17)), "GET TRANSACTION PROVE")

    # A blocked card will not start a transaction (6985): issued all the same, its counters not known.
    blocked = sim_card("41000000000000000013", blocked=True)
    with caplog.at_level("WARNING", logger="backoffice.cards.issuance"), engine.begin() as conn:
        issuance.issue_card(conn, card=issuance.read_card(Direct(blocked)), deposit=0, who="staff:li",
                            now=NOW)
    assert opening_counters(engine, "41000000000000000013") == (None, None)
    said = [r.getMessage() for r in caplog.records if r.name == "backoffice.cards.issuance"]
    assert len(said) == 2 and "41000000000000000013 did not tell its purchase counter" in said[0]
    assert "6985" in said[0] and "did not tell its load counter" in said[1]
    with engine.connect() as conn:
        issued = [a for a in audit.trail(conn) if a.action == "issue"]
    assert [(a.detail["purchase_ttc"], a.detail["load_ttc"]) for a in issued] == [(0, 0), (18, 4),
                                                                                  (None, None)]


def test_a_lost_first_tap_hidden_by_a_load_and_a_tap_is_a_case(engine):
    """The colleague's case, end to end: from 1000 fen a 200 tap, a 200 counter top-up, a 200 tap. The first
    tap's record is deleted: the book (1000) agrees with the card's last word (the load's 1000), while the
    card holds 800. Only the counter at issue gives it away."""
    asn = "41000000000000000014"
    card, psam = sim_card(asn), SimPsam(BUS)
    with engine.begin() as conn:
        issuance.issue_card(conn, card=issuance.read_card(Direct(card)), deposit=0, who="staff:li", now=NOW)
    first = tap_on_bus(card, psam, 200, NOW + timedelta(minutes=1))
    rows = [_tap(1, first, 200, card.balance, 1, asn=asn)]
    topup.counter_topup(engine, Direct(card), keys=KEYS, amount=200, terminal_id=DESK, staff="staff:wang",
                        now=NOW + timedelta(minutes=2))
    second = tap_on_bus(card, psam, 200, NOW + timedelta(minutes=3))
    rows.append(_tap(2, second, 200, card.balance, 3, asn=asn))
    assert (first, second, card.balance) == (0, 1, 800)
    with engine.begin() as conn:
        conn.execute(insert(models.Tap.__table__), rows)
        book = ledger.review_card(conn, asn=asn, now=NOW + timedelta(hours=1))
        assert book.findings == [] and book.balance == card.balance  # every record there: nothing to find
        conn.execute(delete(models.Tap.__table__).where(models.Tap.card_asn == asn, models.Tap.card_ttc == 0))
        book = ledger.review_card(conn, asn=asn, now=NOW + timedelta(hours=2))
        assert (book.balance, book.card_balance, book.agrees) == (1000, 1000, True)  # the books look right
        ledger.review_card(conn, asn=asn, now=NOW + timedelta(hours=3))  # reviewed again: no second case
        opened = cases.open_cases(conn, asn=asn)
    assert [(c.kind, c.key) for c in opened] == [(cases.COUNTER_JUMP, "purchase@issue0-1")]
    assert opened[0].detail == ("1 purchase after issue missing: the card's purchase counter was 0 at issue, "
                                "the first record (tap bus7/2) has 1")


def test_issue_lose_refund_and_adjust_with_an_audit_trail(engine):
    asn = "41000000000000000001"
    with engine.begin() as conn, pytest.raises(issuance.IssueError, match="proof"):
        issuance.issue_card(conn, card=facts(card_type=2), deposit=2000, who="staff:li", now=NOW)
    with engine.begin() as conn:
        issuance.issue_card(conn, card=facts(card_type=2), deposit=2000, who="staff:li", now=NOW,
                            proof="student id 2026-0042")
        with pytest.raises(issuance.IssueError, match="issued already"):
            issuance.issue_card(conn, card=facts(card_type=2), deposit=2000, who="staff:li", now=NOW,
                                proof="again")
    with engine.begin() as conn:
        with pytest.raises(ledger.RefundRefused, match="report it lost"):
            ledger.refund_balance(conn, asn=asn, amount=100, who="staff:li", why="asks", now=NOW)
        book = ledger.adjust(conn, asn=asn, amount=-150, who="staff:zhao", why="tap record lost on bus 7",
                             now=NOW + timedelta(minutes=1))
        assert book.balance == 850
        frozen = issuance.report_lost(conn, asn=asn, who="staff:li", why="rider reports the card lost",
                                      now=NOW + timedelta(minutes=2))
        assert frozen == 850
        assert asn in denied_asns(conn)
        ledger.refund_balance(conn, asn=asn, amount=800, who="staff:li", why="refund to rider",
                              now=NOW + timedelta(minutes=3))
        with pytest.raises(ledger.RefundRefused, match="too much"):
            ledger.refund_balance(conn, asn=asn, amount=51, who="staff:li", why="again", now=NOW)
        ledger.refund_balance(conn, asn=asn, amount=50, who="staff:li", why="the rest", now=NOW)
        book = ledger.card_ledger(conn, asn=asn)
        assert (book.balance, book.refunds, book.adjustments) == (0, 850, -150)
        trail = audit.trail(conn, asn=asn)
    assert [(a.who, a.action, a.amount) for a in trail] == [
        ("staff:li", "issue", 2000), ("staff:zhao", "adjust", -150), ("staff:li", "report_lost", 850),
        ("staff:li", "refund_balance", 800), ("staff:li", "refund_balance", 50)]
    assert trail[1].why == "tap record lost on bus 7"


def _tap(seq, ttc, amount, balance_after, minute, asn="41000000000000000002"):
    return {"device_id": "bus7", "device_seq": seq, "kind": "purchase", "occurred_at": NOW + timedelta(minutes=minute),
            "received_at": NOW + timedelta(hours=1), "operator": "op", "route": "r1", "vehicle": "v1",
            "driver": "d1", "shift_no": 1, "card_asn": asn, "card_type": 1, "card_ttc": ttc, "amount": amount,
            "balance_after": balance_after, "terminal_id": "010000000007", "terminal_seq": 100 + seq,
            "tac": f"{seq:08x}", "reason": ""}


def test_ledger_anomalies_raise_cases_once_and_a_case_can_deny_the_card(engine):
    asn = "41000000000000000002"
    with engine.begin() as conn:
        issuance.issue_card(conn, card=facts(asn, balance=1000), deposit=0, who="staff:li", now=NOW)
        # Taps at card counters 0, 1 and 3: counter 2 never arrived, and the balance does not follow.
        conn.execute(insert(models.Tap.__table__), [_tap(1, 0, 200, 800, 1), _tap(2, 1, 200, 600, 2),
                                                    _tap(3, 3, 200, 200, 4)])
        book = ledger.review_card(conn, asn=asn, now=NOW)
        assert (book.balance, book.card_balance, book.agrees) == (400, 200, False)
        ledger.review_card(conn, asn=asn, now=NOW)  # reviewed again: no second set of cases
        opened = cases.open_cases(conn, asn=asn)
    assert sorted(c.kind for c in opened) == [cases.BALANCE_MISMATCH, cases.BALANCE_MISMATCH, cases.COUNTER_JUMP]
    with engine.begin() as conn:
        jump = next(c for c in opened if c.kind == cases.COUNTER_JUMP)
        cases.close_case(conn, case_id=jump.id, who="staff:zhao", resolution="cloned card suspected",
                         block_card=True, now=NOW)
        assert asn in denied_asns(conn)
        assert [a.action for a in audit.trail(conn, asn=asn)] == ["issue", "close_case"]
        with pytest.raises(ValueError, match="closed already"):
            cases.close_case(conn, case_id=jump.id, who="x", resolution="y", block_card=False, now=NOW)


def test_the_nightly_sweep_reviews_the_issued_cards_seen_since_a_moment(engine):
    """review_cards_seen (called by the nightly clearing job) reviews issued cards whose taps arrived since the
    moment given, on that operator's buses only, and opens each anomaly's case once."""
    bad, good, earlier = "41000000000000000031", "41000000000000000032", "41000000000000000033"
    with engine.begin() as conn:
        for asn in (bad, good, earlier):
            issuance.issue_card(conn, card=facts(asn, balance=1000), deposit=0, who="staff:li", now=NOW)
        rows = [_tap(1, 0, 200, 800, 1, asn=bad), _tap(2, 2, 200, 400, 2, asn=bad),  # counter 1 never came
                _tap(3, 0, 200, 800, 3, asn=good), _tap(4, 0, 200, 700, 4, asn=earlier)]  # earlier: 100 fen off
        rows[3]["received_at"] = NOW - timedelta(days=1)
        other = dict(_tap(5, 1, 200, 600, 5, asn=good), operator="other_op", device_seq=5)
        conn.execute(insert(models.Tap.__table__), [*rows, other])
        reviewed, opened = ledger.review_cards_seen(conn, operator="op", since=NOW, now=NOW + timedelta(hours=2))
        found = cases.open_cases(conn, asn=bad)  # the gap, and the balances that do not follow because of it
        assert reviewed == 2 and opened == len(found) and cases.COUNTER_JUMP in [c.kind for c in found]
        assert cases.open_cases(conn, asn=good) == [] and cases.open_cases(conn, asn=earlier) == []
        assert ledger.review_cards_seen(conn, operator="op", since=NOW, now=NOW + timedelta(hours=3)) == (2, 0)
