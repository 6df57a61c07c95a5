"""What the rider and the driver read on the validator's screen, in Chinese and English."""

from __future__ import annotations

import enum


class Outcome(str, enum.Enum):
    PAID = "paid"
    ENTERED = "entered"  # boarded a distance-fare route: the fare is taken when the rider taps out
    ALREADY_PAID = "already_paid"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    CARD_BLOCKED = "card_blocked"
    CARD_EXPIRED = "card_expired"
    CARD_UNREADABLE = "card_unreadable"
    TAP_AGAIN = "tap_again"
    NO_SHIFT = "no_shift"
    SHIFT_OPENED = "shift_opened"
    SHIFT_CLOSED = "shift_closed"
    OUT_OF_SERVICE = "out_of_service"
    # cardless tickets (validator.tickets): a scanned QR code or a pickup code typed on the driver's keypad
    TICKET_OK = "ticket_ok"
    TICKET_EXPIRED = "ticket_expired"
    TICKET_NOT_YET_VALID = "ticket_not_yet_valid"
    TICKET_WRONG_ROUTE = "ticket_wrong_route"
    TICKET_WRONG_OPERATOR = "ticket_wrong_operator"
    TICKET_USED = "ticket_used"
    TICKET_FORGED = "ticket_forged"  # a bad signature: forged or altered
    TICKET_UNREADABLE = "ticket_unreadable"  # not a ticket, or one signed with a key this bus does not hold
    TICKET_BLOCKED = "ticket_blocked"  # on the deny list
    CODE_WRONG = "code_wrong"  # a pickup code whose check digits do not match
    CODE_LOCKED = "code_locked"  # too many wrong pickup codes: the keypad waits


MESSAGES: dict[Outcome, tuple[str, str]] = {
    Outcome.PAID: ("扣款成功", "Paid"),
    Outcome.ENTERED: ("上车成功 下车请刷卡", "Boarded: tap again when you get off"),
    Outcome.ALREADY_PAID: ("已付款", "Already paid"),
    Outcome.INSUFFICIENT_BALANCE: ("余额不足", "Insufficient balance"),
    Outcome.CARD_BLOCKED: ("此卡已停用", "Card blocked"),
    Outcome.CARD_EXPIRED: ("卡已过期", "Card expired"),
    Outcome.CARD_UNREADABLE: ("无法识别此卡", "Card not recognised"),
    Outcome.TAP_AGAIN: ("请重新刷卡", "Please tap again"),
    Outcome.NO_SHIFT: ("司机未签到", "Driver not signed in"),
    Outcome.SHIFT_OPENED: ("签到成功", "Shift started"),
    Outcome.SHIFT_CLOSED: ("签退成功", "Shift ended"),
    Outcome.OUT_OF_SERVICE: ("暂停服务", "Out of service"),
    Outcome.TICKET_OK: ("验票成功", "Ticket accepted"),
    Outcome.TICKET_EXPIRED: ("车票已过期", "Ticket expired"),
    Outcome.TICKET_NOT_YET_VALID: ("车票尚未生效", "Ticket not valid yet"),
    Outcome.TICKET_WRONG_ROUTE: ("车票不适用本线路", "Ticket not valid on this route"),
    Outcome.TICKET_WRONG_OPERATOR: ("非本公司车票", "Ticket of another company"),
    Outcome.TICKET_USED: ("车票已使用", "Ticket already used"),
    Outcome.TICKET_FORGED: ("无效车票", "Invalid ticket"),
    Outcome.TICKET_UNREADABLE: ("无法识别此票", "Ticket not recognised"),
    Outcome.TICKET_BLOCKED: ("车票已停用", "Ticket blocked"),
    Outcome.CODE_WRONG: ("取票码错误", "Wrong pickup code"),
    Outcome.CODE_LOCKED: ("错误次数过多 请稍后再试", "Too many wrong codes: try later"),
}


def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{whole}.{cents:02d}"


def screen_text(outcome: Outcome, fare: int | None = None, balance: int | None = None) -> str:
    """One line for the validator's display, Chinese first."""
    zh, en = MESSAGES[outcome]
    parts = [f"{zh} {en}"]
    if fare is not None:
        parts.append(f"票价 Fare ¥{yuan(fare)}")
    if balance is not None:
        parts.append(f"余额 Balance ¥{yuan(balance)}")
    return " | ".join(parts)
