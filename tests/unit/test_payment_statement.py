"""The payment platform's daily statement as farebox reads it (backoffice.payments.service.read_statement): the
documented columns in any order, whole fen, UTC times; anything else is refused with the line named, so nothing of a
bad file is stored. The simulator's file (hardware_sim.payment) reads back as its own ledger."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from backoffice.payments.service import StatementError, read_statement
from hardware_sim.payment import PlatformSimulator, fee_of

HEADER = "kind,order_id,ref,amount,fee,at\r\n"


def test_a_good_file_reads_as_written_columns_in_any_order():
    rows = read_statement("\ufeffat,fee,amount,ref,order_id,kind\r\n"
                          "2026-12-03T02:00:00Z,2,300,pay_1,TK1,payment\r\n\r\n"
                          "2026-12-03T03:00:00.5+00:00,0,100,RF1,TK1,refund\r\n")
    assert rows == [
        {"kind": "payment", "order_id": "TK1", "ref": "pay_1", "amount": 300, "fee": 2,
         "at": datetime(2026, 12, 3, 2, 0, tzinfo=UTC)},
        {"kind": "refund", "order_id": "TK1", "ref": "RF1", "amount": 100, "fee": 0,
         "at": datetime(2026, 12, 3, 3, 0, 0, 500000, tzinfo=UTC)}]


@pytest.mark.parametrize("text, words", [
    ("order_id,amount,status,paid_at\r\n", "columns"),
    (HEADER + "payment,TK1,pay_1,3.00,0,2026-12-03T02:00:00Z\r\n", "line 2: amount"),
    (HEADER + "payment,TK1,pay_1,0,0,2026-12-03T02:00:00Z\r\n", "line 2: amount"),
    (HEADER + "payment,TK1,pay_1,-5,0,2026-12-03T02:00:00Z\r\n", "line 2: amount"),
    (HEADER + "chargeback,TK1,pay_1,5,0,2026-12-03T02:00:00Z\r\n", "line 2: kind"),
    (HEADER + "payment,TK1,pay_1,5,0,2026-12-03 10:00\r\n", "line 2: at must be UTC"),
    (HEADER + "payment,TK1,pay_1,5,0,yesterday\r\n", "line 2: at"),
    (HEADER + "payment,TK 1,pay_1,5,0,2026-12-03T02:00:00Z\r\n", "line 2: order_id"),
    (HEADER + "payment,TK1,pay_1,5,0\r\n", "line 2: 5 fields"),
    (HEADER + "payment,TK1,pay_1,5,0,2026-12-03T02:00:00Z\r\npayment,TK2,pay_2,1" + "0" * 20 + ",0,"
     "2026-12-03T02:00:00Z\r\n", "line 3: amount"),
])
def test_a_bad_file_is_refused_naming_the_line(text, words):
    with pytest.raises(StatementError, match=words):
        read_statement(text)


def test_the_simulators_file_reads_back_as_its_ledger_and_is_the_same_every_time():
    clock = lambda: datetime(2026, 12, 3, 15, 59, 59, tzinfo=UTC)  # 23:59:59 in Shanghai: still the 3rd
    sim = PlatformSimulator(clock=clock)
    sim.orders["TK1"] = {"order_id": "TK1", "amount": 1234, "status": "created", "payment_ref": None,
                         "paid_at": None, "notify_url": "", "description": ""}
    ref = sim.rider_pays("TK1")
    text = sim.statement(date(2026, 12, 3))
    assert text == sim.statement(date(2026, 12, 3))
    assert read_statement(text) == [{"kind": "payment", "order_id": "TK1", "ref": ref, "amount": 1234,
                                     "fee": fee_of(1234), "at": clock()}]
    assert fee_of(1234) == 7  # 0.6 % of 12.34 yuan = 7.404 fen
    assert read_statement(sim.statement(date(2026, 12, 4))) == []
