"""``farebox sim card``: a simulated e-purse card (hardware_sim.card.SimCard) served where real readers can reach it.

- ``--vpcd PORT``: into pcscd's vpcd reader on that port (default host 127.0.0.1); every PC/SC program sees it.
  farebox's pcscd config has readers on 0x9C40 ("farebox vpcd 00 00") and 0x9C41 ("farebox vpcd 00 01").
- ``--nfc-udp PORT``: as an ISO-DEP card on nfcpy's udp driver (reader: ``nfc:udp:127.0.0.1:PORT``).
- ``--rfid24``: as a phone SIM in a simulated 2.45 GHz module on a new pty; the device path is printed
  (reader: ``rfid24:/dev/pts/N``).
- none of these: ``--apdu HEX [HEX ...]`` sends those APDUs to the card here and prints the answers; with only
  ``--state FILE`` the card is made (or shown) and kept in FILE, for ``farebox card issue --sim-state``, ``farebox
  topup counter --sim-state`` and ``farebox validator run --tap``.

It prints the card (ASN, type, balance in yuan, algorithm) and where it is served, then serves until Ctrl-C or
SIGTERM. ``--state FILE`` keeps the card between runs: an existing file is loaded (the card options are then
ignored), a new one is written; the card writes it before each answer. ``--debug`` logs every APDU.

Keys: a simulated card is personalised with the issuer keys the settings name (``FAREBOX_ISSUER_KEYS``, unlocked as
the back office unlocks them), as a card factory personalises cards with the issuer's master keys, so the back office
verifies its TACs and loads it; without that setting, with the published test keys (epurse/keys.py).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import threading
from datetime import date, timedelta
from pathlib import Path

from farebox.cli_types import amount_in_yuan

log = logging.getLogger(__name__)

CARD_TYPES = {"adult": 1, "student": 2, "elderly": 3, "staff": 4, "driver": 5}
ALGORITHMS = {"3des": 0x00, "sm4": 0x04}


def _port(text: str) -> int:
    try:
        port = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (decimal, or hex as 0x9C40)") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} is out of range")
    return port


def _asn(text: str) -> bytes:
    try:
        asn = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex") from None
    if len(asn) != 10:
        raise argparse.ArgumentTypeError("an ASN is 10 bytes: 20 hex digits")
    return asn


def _apdu(text: str) -> bytes:
    try:
        apdu = bytes.fromhex(text.replace(" ", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex") from None
    if len(apdu) < 4:
        raise argparse.ArgumentTypeError("an APDU has at least CLA INS P1 P2")
    return apdu


def add_parser(sub) -> None:
    """Register ``farebox sim card`` on the top-level subparsers."""
    p = sub.add_parser("sim", help="simulated devices")
    sim = p.add_subparsers(dest="action", required=True)
    p = sim.add_parser("card", help="a simulated e-purse card, served to PC/SC, NFC or RFID-SIM readers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", choices=sorted(CARD_TYPES), default="adult")
    p.add_argument("--balance", type=amount_in_yuan, default=10_000, metavar="YUAN",
                   help="starting balance in yuan, e.g. 100.00 (default 100.00)")
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="3des")
    p.add_argument("--asn", type=_asn, default=None, metavar="HEX", help="20 hex digits (default: random)")
    p.add_argument("--staff-no", default=None, help="staff number on the holder file (driver default D0001)")
    p.add_argument("--valid-days", type=int, default=3650,
                   help="valid for this many days from 30 days ago (so a trial day's clock may lie in the past)")
    p.add_argument("--state", type=Path, default=None, metavar="FILE",
                   help="keep the card in FILE between runs (loaded if it exists)")
    p.add_argument("--vpcd", type=_port, default=None, metavar="PORT", help="serve into pcscd's vpcd on PORT")
    p.add_argument("--vpcd-host", default="127.0.0.1")
    p.add_argument("--nfc-udp", type=_port, default=None, metavar="PORT", help="serve on nfcpy's udp driver")
    p.add_argument("--rfid24", action="store_true", help="serve in a simulated RFID-SIM module on a new pty")
    p.add_argument("--apdu", type=_apdu, action="extend", nargs="+", default=[], metavar="HEX",
                   help="(without a place to serve) send these APDUs in turn and print the answers: "
                        "--apdu A B C, or --apdu A --apdu B")
    p.add_argument("--debug", action="store_true", help="log every APDU")
    p.set_defaults(func=run)


class _LockedCard:
    """One card served in several places at once still answers one command at a time, and logs each."""

    def __init__(self, card):
        self.card = card
        self.asn = card.asn
        self._lock = threading.Lock()

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            response = self.card.transmit(apdu)
        log.debug("APDU %s -> %s", bytes(apdu).hex(), response.hex())
        return response


def sim_issuer_keys(settings):
    """The issuer master keys simulated cards and PSAMs are personalised with: the ones the settings name
    (``FAREBOX_ISSUER_KEYS``: an encrypted key file unlocked by FAREBOX_ISSUER_KEYS_PASSPHRASE or _KEK, or a plain
    TOML file), else the published test keys. A simulator's business only: the back office itself holds its keys
    behind its key service."""
    import os

    from epurse.keys import TEST_ISSUER_KEYS

    path = getattr(settings, "issuer_keys_file", None)
    if path is None:
        return TEST_ISSUER_KEYS
    from backoffice.keyservice import is_key_file, open_key_file
    from farebox.keys import _kek_from_env, read_plain_keys

    content = Path(path).read_bytes()
    if not is_key_file(content):
        return read_plain_keys(path)
    passphrase, kek = _kek_from_env(os.environ)
    return open_key_file(content, passphrase=passphrase, kek=kek, path=str(path))


def load_sim_card(path: Path, settings):
    """A simulated card kept in a state file, with the keys of :func:`sim_issuer_keys`."""
    from hardware_sim.card import SimCard

    return SimCard.load(path, keys=sim_issuer_keys(settings))


def _make_card(args, settings=None):
    from hardware_sim.card import SimCard

    keys = sim_issuer_keys(settings)
    if args.state is not None and args.state.exists():
        return SimCard.load(args.state, keys=keys), f"loaded from {args.state}"
    today = date.today()
    asn = args.asn or bytes.fromhex("3100" + "".join(secrets.choice("0123456789") for _ in range(16)))
    staff_no = args.staff_no if args.staff_no is not None else ("D0001" if args.type == "driver" else "")
    kwargs = {"state_file": args.state} if args.state is not None else {}
    if args.state is not None:
        args.state.parent.mkdir(parents=True, exist_ok=True)
    start = today - timedelta(days=30)
    card = SimCard(asn, CARD_TYPES[args.type], args.balance, start=start, end=start + timedelta(days=args.valid_days),
                   staff_no=staff_no, algorithm=ALGORITHMS[args.algorithm], keys=keys, **kwargs)
    return card, f"new, kept in {args.state}" if args.state is not None else "new, not kept"


def _describe(card) -> str:
    kind = {v: k for k, v in CARD_TYPES.items()}.get(card.card_type, f"type {card.card_type}")
    alg = {v: k for k, v in ALGORITHMS.items()}.get(getattr(card, "algorithm", 0), "?")
    from clearing.money import yuan

    return (f"card ASN {card.asn.hex()}  type {kind}  balance {yuan(card.balance, symbol='¥')}  "
            f"algorithm {alg}  TTC {card.ttc}")


def run(args, settings=None) -> int:
    if args.debug:
        root = logging.getLogger()
        root.setLevel(logging.DEBUG)
        for handler in root.handlers:
            handler.setLevel(logging.DEBUG)
    try:
        card, origin = _make_card(args, settings)
    except (OSError, ValueError) as e:
        print(f"farebox sim card: {e}", file=sys.stderr)
        return 2
    print(f"{_describe(card)}  ({origin})", flush=True)
    served = args.vpcd is not None or args.nfc_udp is not None or args.rfid24
    if not served:
        if not args.apdu:
            if args.state is not None:
                return 0  # made (or shown) and kept in its state file
            print("farebox sim card: say where to serve it (--vpcd, --nfc-udp, --rfid24), give --apdu, or keep it "
                  "in a file with --state FILE", file=sys.stderr)
            return 2
        for apdu in args.apdu:
            print(f"> {apdu.hex().upper()}\n< {card.transmit(apdu).hex().upper()}", flush=True)
        print(_describe(card))
        return 0
    return _serve(args, _LockedCard(card), card)


def _serve(args, locked: _LockedCard, card) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    closers = []
    vpcd = None
    try:
        if args.vpcd is not None:
            from hardware_sim.vpcd import VpcdCard, reader_name

            vpcd = VpcdCard(locked, args.vpcd_host, args.vpcd)
            vpcd.insert()
            closers.append(vpcd.remove)
            print(f"serving: vpcd {args.vpcd_host}:{args.vpcd} (0x{args.vpcd:04X}; with farebox's pcscd config "
                  f"the PC/SC reader is {reader_name(args.vpcd)!r})", flush=True)
        if args.nfc_udp is not None:
            from hardware_sim.nfc_card import NfcCard

            nfc_card = NfcCard(locked, args.nfc_udp).start()
            closers.append(nfc_card.stop)
            print(f"serving: nfc udp port {args.nfc_udp} (reader path nfc:udp:127.0.0.1:{args.nfc_udp})", flush=True)
        if args.rfid24:
            from hardware_sim.rfid24_module import Rfid24Module

            module = Rfid24Module(locked)
            closers.append(module.close)
            print(f"serving: rfid24 module on {module.path} (reader path rfid24:{module.path})", flush=True)
    except (ConnectionError, OSError) as e:
        print(f"farebox sim card: {e}", file=sys.stderr)
        for close in reversed(closers):
            close()
        return 1
    print("Ctrl-C or SIGTERM to stop", flush=True)
    while not stop.wait(0.5):
        if vpcd is not None and not vpcd.inserted:
            # pcscd restarted: put the card back in as soon as vpcd listens again
            try:
                vpcd.insert(timeout=1.0)
                log.info("vpcd: card inserted again after the connection dropped")
            except ConnectionError:
                pass
    for close in reversed(closers):
        close()
    print(f"stopped. {_describe(card)}", flush=True)
    return 0
