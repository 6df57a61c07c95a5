"""The over-the-air host as the phone (through the operator's OTA gateway) and the payment platform reach it: each
call is one transaction over :mod:`backoffice.cards.topup` and, for the platform's notifications,
:mod:`backoffice.payments.notify`.

It lives beside them rather than in ``topup`` so that ``payments`` (which marks orders paid through ``topup``) and
``topup`` do not import each other."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine

from backoffice.cards import topup
from backoffice.keyservice import KeyService
from backoffice.payments import notify
from epurse import apdu


class OtaHost:
    """Each call one transaction, rolled back on a refusal unless the refusal carries a proven fact it must keep
    (``TopupRefused.keep``: an order now unconfirmed because the card's MAC1 showed a higher counter)."""

    def __init__(self, engine: Engine, keys: KeyService, *, webhook_key: bytes | None = None,
                 clock=None):
        self.engine = engine
        self.keys = keys
        self.webhook_key = webhook_key  # the payment platform's Ed25519 public key (32 bytes)
        self.clock = clock or (lambda: datetime.now(UTC))

    def __repr__(self) -> str:
        return f"<OtaHost on {self.engine.url.render_as_string(hide_password=True)}>"

    def _run(self, fn, **kwargs):
        with self.engine.connect() as conn:
            trans = conn.begin()
            try:
                result = fn(conn, now=self.clock(), **kwargs)
            except topup.TopupRefused as e:
                (trans.commit if e.keep else trans.rollback)()
                raise
            except BaseException:
                trans.rollback()
                raise
            trans.commit()
            return result

    def payment_webhook(self, body: bytes, signature: str) -> str:
        """The platform's notification (``POST /api/v1/ota/webhook`` calls this): verified and applied once by
        backoffice.payments.notify, for a ticket order, a top-up order or a refund alike."""
        return self._run(notify.handle_notification, body=body, signature=signature, public_key=self.webhook_key)

    def authorize(self, *, order_id: str, asn: str, init_answer: bytes, terminal_id: bytes,
                  log: list[bytes] | None = None) -> topup.LoadGrant:
        """``init_answer``: the SIM's INITIALIZE FOR LOAD data (16 bytes); ``log``: its READ RECORD data."""
        try:
            init = apdu.parse_init_load(init_answer)
            records = None if log is None else [apdu.parse_log_record(r) for r in log]
        except apdu.ResponseError as e:
            raise topup.TopupRefused("bad_request", str(e)) from None
        return self._run(topup.authorize_ota, keys=self.keys, order_id=order_id, asn=asn, init=init,
                         terminal_id=terminal_id, log=records)

    def report(self, *, order_id: str, tac: bytes) -> topup.Order:
        return self._run(topup.report_tac, keys=self.keys, order_id=order_id, tac=tac)

    def card_seen(self, *, asn: str, online_ttc: int, log: list[bytes],
                  proofs: list[tuple[int, bytes]] = ()) -> dict[int, str]:
        """What the phone says its SIM shows: online counter, log, and the SIM's answers to GET TRANSACTION PROVE
        for loads (online TTC, 8-byte answer MAC2 || TAC). Only the proofs can settle a load the card made; the
        rest can confirm one, never void it."""
        try:
            records = [apdu.parse_log_record(r) for r in log]
            proven = [topup.LoadProof(ttc, apdu.parse_transaction_prove(answer).tac) for ttc, answer in proofs]
        except apdu.ResponseError as e:
            raise topup.TopupRefused("bad_request", str(e)) from None
        return self._run(topup.resolve_from_card, asn=asn, online_ttc=online_ttc, log=records, keys=self.keys,
                         proofs=proven)
