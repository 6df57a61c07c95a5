"""A simulated phone running the operator's top-up menu: it relays the load protocol between the back office
(the issuer host) and its RFID-SIM, and can misbehave the way phones do.

``Phone(sim, host, terminal_id)``: ``sim`` answers APDUs (a hardware_sim SimCard); ``host`` is the back office as
the phone reaches it (``authorize(order_id=, asn=, init_answer=, terminal_id=, log=)`` -> a grant with
``credit_apdu()``, ``report(order_id=, tac=)``; backoffice.cards.ota_host.OtaHost, or an HTTP client with the same
methods). ``topup(order_id, amount)`` runs: SELECT, read the public file and the log (READ RECORD 1..10),
INITIALIZE FOR LOAD, ask the host for MAC2, CREDIT FOR LOAD, report the TAC.

Faults, each for the next ``topup`` only, set as attributes:
- ``lose_answer``: the host's MAC2 answer is lost on the way (a timeout): ``topup`` raises HostTimeout, and the
  phone remembers its open card session, so ``retry(order_id)`` asks again with the same INITIALIZE answer.
- ``vanish_after_credit``: the phone dies right after the SIM answered CREDIT FOR LOAD: no report (PhoneGone).
``send_log`` (default True) relays the SIM's log with each request, which lets the host settle earlier loads;
``send_proofs`` (default True) relays, when the phone comes back (``show_card``), the SIM's answer to GET
TRANSACTION PROVE for its newest load, the one thing a phone can relay that proves what the card did.

``LyingPhone`` is the attacker's phone: it never reports a TAC, and when it "comes back" it shows the host the SIM as
it was before its first load (the counter and log it saw then, no proofs), hoping the host voids the load it gave
and hands out a new MAC2 for the same payment.
"""

from __future__ import annotations

from epurse import apdu


class HostTimeout(Exception):
    """The host's answer never reached the phone."""


class PhoneGone(Exception):
    """The phone switched off (battery, signal) in the middle of a top-up."""


class Phone:
    def __init__(self, sim, host, terminal_id: bytes):
        self.sim = sim
        self.host = host
        self.terminal_id = terminal_id
        self.lose_answer = False
        self.vanish_after_credit = False
        self.send_log = True  # False: an older menu app that relays INITIALIZE FOR LOAD only
        self.send_proofs = True  # False: a menu app that does not ask the SIM for GET TRANSACTION PROVE
        self._open: tuple[str, str, bytes, list[bytes]] | None = None  # order, asn, INITIALIZE answer, log

    def __repr__(self) -> str:
        return f"<Phone with SIM {self.sim.asn.hex()}>"

    def _send(self, command: bytes, what: str) -> bytes:
        return apdu.check(self.sim.transmit(command), what)

    def read_sim(self) -> tuple[str, list[bytes]]:
        """SELECT, the SIM's ASN and its log records (raw 23-byte READ RECORD data, newest first)."""
        answer = self.sim.transmit(apdu.select_aid())
        if answer[-2:] not in (b"\x90\x00", b"\x62\x83"):
            apdu.check(answer, "SELECT")
        info = apdu.parse_public_info(self._send(apdu.read_public_info(), "READ BINARY"))
        log = []
        for n in range(1, 11):
            answer = self.sim.transmit(apdu.read_log_record(n))
            if answer[-2:] != b"\x90\x00":
                break
            log.append(answer[:-2])
        return info.asn.hex(), log

    def topup(self, order_id: str, amount: int):
        asn, log = self.read_sim()
        init_answer = self._send(apdu.init_load(1, amount, self.terminal_id), "INITIALIZE FOR LOAD")
        self._open = (order_id, asn, init_answer, log)
        return self._finish()

    def retry(self, order_id: str):
        """Ask the host again for the card session left open by a lost answer (same INITIALIZE answer)."""
        if self._open is None or self._open[0] != order_id:
            raise ValueError(f"no open card session for order {order_id}: start again with topup()")
        return self._finish()

    def _finish(self):
        order_id, asn, init_answer, log = self._open
        grant = self.host.authorize(order_id=order_id, asn=asn, init_answer=init_answer,
                                    terminal_id=self.terminal_id, log=log if self.send_log else None)
        if self.lose_answer:
            self.lose_answer = False
            raise HostTimeout(f"order {order_id}: no answer from the host")
        self._open = None
        # The SIM keeps the load open only for the very next command, so CREDIT follows the answer at once.
        tac = apdu.parse_credit(self._send(grant.credit_apdu(), "CREDIT FOR LOAD"))
        if self.vanish_after_credit:
            self.vanish_after_credit = False
            raise PhoneGone(f"order {order_id}: the phone went dark after CREDIT FOR LOAD")
        return self.host.report(order_id=order_id, tac=tac)

    def read_counter(self) -> int:
        """The SIM's online counter, from an INITIALIZE FOR LOAD for 0 fen that is never completed."""
        init = apdu.parse_init_load(self._send(apdu.init_load(1, 0, self.terminal_id), "INITIALIZE FOR LOAD"))
        self.sim.transmit(apdu.get_balance())  # any command ends the probe's load session on the SIM
        return init.online_ttc

    def read_proofs(self, log: list[bytes]) -> list[tuple[int, bytes]]:
        """The SIM's GET TRANSACTION PROVE answer for its newest load, as (online TTC, MAC2 || TAC)."""
        loads = [r for r in map(apdu.parse_log_record, log) if r.tx_type == apdu.TX_LOAD]
        if not loads:
            return []
        answer = self.sim.transmit(apdu.get_transaction_prove(apdu.TX_LOAD, loads[0].ttc))
        return [(loads[0].ttc, answer[:-2])] if answer[-2:] == b"\x90\x00" else []

    def show_card(self):
        """The phone comes back: it tells the host what its SIM says (online counter, log, and its proof)."""
        asn, log = self.read_sim()
        online_ttc = self.read_counter()
        proofs = self.read_proofs(log) if self.send_proofs else []
        return self.host.card_seen(asn=asn, online_ttc=online_ttc, log=log, proofs=proofs)


class LyingPhone(Phone):
    """A phone that keeps the money: it loads, never reports the TAC, relays the SIM's log only as it was before its
    first load, shows the host the SIM as it was then (``show_card``), and may replay any INITIALIZE FOR LOAD answer
    it got (``replay``)."""

    def __init__(self, sim, host, terminal_id: bytes):
        super().__init__(sim, host, terminal_id)
        self.before: tuple[str, int, list[bytes]] | None = None  # asn, online counter, log before its first load
        self.captured: list[tuple[str, bytes, list[bytes]]] = []  # every INITIALIZE answer it ever saw

    def topup(self, order_id: str, amount: int):
        asn, log = self.read_sim()
        if self.before is None:
            self.before = (asn, self.read_counter(), log)
        log = self.before[2]  # it never shows a log with its loads in it
        init_answer = self._send(apdu.init_load(1, amount, self.terminal_id), "INITIALIZE FOR LOAD")
        self.captured.append((order_id, init_answer, log))
        grant = self.host.authorize(order_id=order_id, asn=asn, init_answer=init_answer,
                                    terminal_id=self.terminal_id, log=log)
        apdu.check(self.sim.transmit(grant.credit_apdu()), "CREDIT FOR LOAD")
        return None  # and the TAC is never reported

    def show_card(self):
        asn, online_ttc, log = self.before
        return self.host.card_seen(asn=asn, online_ttc=online_ttc, log=log, proofs=[])

    def replay(self, order_id: str, which: int = -1):
        """Relay an INITIALIZE answer captured earlier (a genuine MAC1, at an old counter) with its old log."""
        _order, init_answer, log = self.captured[which]
        return self.host.authorize(order_id=order_id, asn=self.before[0], init_answer=init_answer,
                                   terminal_id=self.terminal_id, log=log)


# -- the rider's menu: balance and recent transactions, straight from the SIM -----------------------------------

MENU_TEXTS = {
    "title": ("公交卡", "Transit card"),
    "balance": ("余额", "Balance"),
    "recent": ("最近交易", "Recent transactions"),
    "none": ("暂无交易", "No transactions yet"),
    "ride": ("乘车", "Ride"),
    "load": ("充值", "Top-up"),
    "other": ("交易", "Transaction"),
    "blocked": ("此卡已停用, 请联系营业厅", "Card blocked: visit a service counter"),
    "terminal": ("终端", "terminal"),
}
_KINDS = {apdu.TX_PURCHASE: "ride", apdu.TX_COMPOSITE: "ride", apdu.TX_LOAD: "load"}


class PhoneMenu:
    """What the rider sees in the SIM toolkit menu "Balance and recent transactions": read over APDUs from the SIM
    itself, no network needed (so it is what the card holds, not what the back office has heard yet).

    SELECT the transit application (a deny-listed SIM answers 6283 and is read all the same, with a warning line),
    READ BINARY of the public file for the card number, GET BALANCE (``80 5C 00 02 04``), and READ RECORD 1..10 of
    the transaction log (SFI 18, record 1 the newest, ``00 B2 nn C4 17``), stopping at the first record the SIM
    does not have (6A83). The log's date and time are what the terminal or the top-up host sent with the
    transaction, in UTC (see wire.records); the menu shows them on the phone's clock, ``tz``."""

    def __init__(self, sim, *, language: str = "zh", tz: str = "Asia/Shanghai"):
        if language not in ("zh", "en"):
            raise ValueError(f"the phone menu speaks zh or en, not {language!r}")
        self.sim = sim
        self.language = language
        self.tz = tz

    def _t(self, key: str) -> str:
        zh, en = MENU_TEXTS[key]
        return zh if self.language == "zh" else en

    def read(self) -> tuple[str, int | None, list[apdu.LogRecord], bool]:
        """(card number, balance in fen (None: refused), up to 10 log records newest first, blocked) as the SIM
        says them."""
        selected = self.sim.transmit(apdu.select_aid())
        if selected[-2:] not in (b"\x90\x00", b"\x62\x83"):
            apdu.check(selected, "SELECT")
        info = apdu.parse_public_info(apdu.check(self.sim.transmit(apdu.read_public_info()), "READ BINARY"))
        answer = self.sim.transmit(apdu.get_balance())
        # A blocked application may refuse GET BALANCE: the menu then says so instead of a number
        balance = apdu.parse_balance(answer[:-2]) if answer[-2:] == b"\x90\x00" else None
        log = []
        for n in range(1, 11):
            answer = self.sim.transmit(apdu.read_log_record(n))
            if answer[-2:] != b"\x90\x00":
                break
            log.append(apdu.parse_log_record(answer[:-2]))
        return info.asn.hex(), balance, log, selected[-2:] == b"\x62\x83"

    def when(self, record: apdu.LogRecord) -> str:
        from datetime import UTC, datetime
        from zoneinfo import ZoneInfo

        at = datetime.strptime(record.date.hex() + record.time.hex(), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        return at.astimezone(ZoneInfo(self.tz)).strftime("%m-%d %H:%M")

    def lines(self) -> list[str]:
        """The menu's screen, one language, money in yuan with two decimals."""
        asn, balance, log, blocked = self.read()
        shown = "-" if balance is None else f"¥{balance // 100}.{balance % 100:02d}"
        out = [f"{self._t('title')} …{asn[-8:]}", f"{self._t('balance')} {shown}"]
        if blocked:
            out.append(self._t("blocked"))
        out.append(self._t("recent"))
        if not log:
            out.append("  " + self._t("none"))
        for r in log:
            kind = _KINDS.get(r.tx_type, "other")
            sign = "+" if kind == "load" else "-"
            out.append(f"  {self.when(r)}  {self._t(kind)}  {sign}{r.amount // 100}.{r.amount % 100:02d}  "
                       f"{self._t('terminal')} {r.terminal_id.hex()}")
        return out

    def show(self) -> str:
        return "\n".join(self.lines()) + "\n"
