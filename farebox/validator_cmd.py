"""``farebox validator run``: one bus validator as a process, wired from its command line; ``farebox validator
shift-report``: a driver's shift report reprinted from a validator's journal.

    farebox validator run --device bus0042 --operator citybus --route r12 --vehicle v7 \\
        --reader rfid24:/dev/ttyS1 --psam pcsc:1 --journal /var/lib/farebox/journal.db \\
        --fares /var/lib/farebox/fares.json --deny-list /var/lib/farebox/denylist.bin \\
        --mqtt mqtts://bus0042@broker.example:8883 --mqtt-password-file /etc/farebox/mqtt.pass \
        --mac-key @/etc/farebox/mac.key --signing-public-key @/etc/farebox/signing.pub \
        --staging-dir /var/lib/farebox/staging

The rider reader and the PSAM are reader paths (``sim:``, ``pcsc:``, ``nfc:``, ``rfid24:``). ``--psam sim:<terminal
number>`` puts a simulated PSAM with the published test keys in the slot, for benches and demos; its terminal
sequence starts after the highest one in the journal, as a real PSAM's counter would survive a restart. Without
``--mqtt`` the validator runs offline and its journal keeps everything. SIGTERM or Ctrl-C stops it cleanly.

The link: the broker user is the device id and its password and MAC key are the two values ``farebox device add``
prints (the password in the URL or, kept out of ``ps``, in ``--mqtt-password-file``; a key as hex or ``@file``).
Packages from the back office are checked with ``--signing-public-key`` and staged in ``--staging-dir`` (default:
``staging`` beside the journal), then applied between taps; the deny list and fare table they bring are written to
``--deny-list`` (default: ``denylist.bin`` in the staging folder) and ``--fares``. Left out, the MAC key and the
signing key would be the published TEST values, as a ``--psam sim:`` holds the published issuer keys: the validator
refuses to start on them unless told ``--insecure-test-keys`` (labs and benches; a banner says so).

A trial without a bus (labs, a new company's first day): ``--reader sim: --tap FILE [FILE ...]`` presents
simulated cards (``farebox sim card --state FILE`` makes them) one after another on the in-process reader, as
riders and drivers would, then stops once the back office has acknowledged every record (offline: at once).
``--trial-clock ISO`` runs the terminal's clock from that moment, each card two minutes after the one before, so a
trial day may lie in the past and be settled at once; it is refused on any reader but ``sim:``. A ``--psam sim:``
and the simulated cards hold the issuer keys the settings name (FAREBOX_ISSUER_KEYS), as the issuer personalises
them; the published test keys only when none is set.

E-tickets: ``--scanner qr:/dev/ttyUSB1[?baud=9600]`` reads riders' QR tickets from a 2D scanner module beside the card
reader; a driver keypad (``--keypad``) takes pickup codes (key 5, 16 digits, #). Both are checked offline with the
ticket keys the params package brings (validator.tickets) and recorded as ``ticket_use`` in the journal.

Where the bus is, for distance fares: ``--gps /dev/ttyS2[:9600]`` reads a GPS receiver's NMEA 0183 and snaps the bus
to the nearest of the route's stops (coordinates in the fare table's ``stops``) within ``--stop-radius`` metres;
``--stop-button FIFO`` takes the driver's stop button as lines on a named pipe (``next``, ``back``, a number), for a
tunnel or a bus without GPS (validator/gps.py). Without either the bus stays at stop 0.

    farebox validator shift-report --journal /var/lib/farebox/journal.db [--shift N] [--width 48]

prints the last shift's report (or shift N's), marked as a reprint, as the bus printer would: counts and amounts by
card type, from the journal's shift summary, which outlives the pruning of the records themselves. The journal
may be in use by a running validator (SQLite WAL lets a reader beside it).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    group = sub.add_parser("validator", help="a bus validator: run one, or reprint a shift report from its journal",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = group.add_subparsers(dest="validator_action", required=True)
    _add_report_parser(actions)
    p = actions.add_parser("run", help="run one bus validator (reader, PSAM, journal, display, uplink)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", required=True, help="device id, as registered in the back office")
    p.add_argument("--operator", required=True)
    p.add_argument("--route", required=True)
    p.add_argument("--vehicle", required=True)
    p.add_argument("--reader", required=True, help="the riders' reader: sim:, pcsc:NAME|N, nfc:PATH, rfid24:DEV")
    p.add_argument("--psam", required=True, help="the PSAM slot: a reader path, or sim:<12 hex digits>")
    p.add_argument("--journal", type=Path, required=True)
    p.add_argument("--journal-budget-mb", type=int, default=256)
    p.add_argument("--fares", type=Path, required=True, help="fare table JSON (reloaded when it changes)")
    p.add_argument("--deny-list", type=Path, default=None, help="deny list file (reloaded when it changes)")
    p.add_argument("--mqtt", default=None, action="append", help="broker URL for the uplink, "
                   "mqtt[s]://<device>:<password>@host (default: offline); a cluster's nodes comma-separated or "
                   "--mqtt repeated: the uplink fails over to the next when its node dies")
    p.add_argument("--mqtt-password-file", type=Path, default=None,
                   help="the device's broker password, read from this file instead of the URL")
    p.add_argument("--mac-key", default=None,
                   help="the device's MAC key (64 hex digits, or @FILE holding them), as 'farebox device add' "
                        "prints (left out: the published TEST value, refused without --insecure-test-keys)")
    p.add_argument("--signing-public-key", default=None,
                   help="the back office's Ed25519 package-signing public key (64 hex digits or @FILE); "
                        "left out: the published TEST key, refused without --insecure-test-keys")
    p.add_argument("--staging-dir", type=Path, default=None,
                   help="where packages wait for their activation time (default: staging/ beside the journal)")
    p.add_argument("--software-version", default=None, help="the version reported in status (default: the "
                   "installed farebox's)")
    p.add_argument("--heartbeat-seconds", type=float, default=60.0)
    p.add_argument("--denylist-max-age-hours", type=float, default=48.0,
                   help="a deny list older than this raises the 'denylist stale' alarm")
    p.add_argument("--double-tap-seconds", type=int, default=30,
                   help="the same card again within this window is told 'already paid'")
    p.add_argument("--tz", default="Asia/Shanghai")
    p.add_argument("--languages", default="zh,en", help="display languages, comma-separated")
    p.add_argument("--gps", default=None, metavar="DEV[:BAUD]",
                   help="the GPS receiver's serial port, NMEA 0183 (e.g. /dev/ttyS2:9600; default baud 9600): "
                        "the bus's stop for distance fares, snapped to the route's stops in the fare table")
    p.add_argument("--stop-radius", type=float, default=40.0,
                   help="metres from a stop within which the bus is at that stop (GPS)")
    p.add_argument("--stop-button", type=Path, default=None, metavar="FIFO",
                   help="a named pipe (made if missing) the driver's stop button writes to: a line 'next', "
                        "'back' or a stop number; works with or without --gps")
    p.add_argument("--keypad", default=None, metavar="PATH",
                   help="the driver's keypad for the driver menu (validator.driver_menu): console: (standard input) "
                        "or serial:DEV[?baud=9600]; left out: no menu")
    p.add_argument("--printer", default=None, metavar="PATH",
                   help="the ESC/POS slip printer: serial:DEV[?baud=9600] or console:; left out: slips on the "
                        "screen only")
    p.add_argument("--scanner", default=None, metavar="PATH",
                   help="the 2D (QR) scanner for e-tickets, beside the card reader: qr:DEV[?baud=9600] (the module "
                        "sends each code's text and CR); tickets are checked with the keys in the params package")
    p.add_argument("--pickup-max-wrong", type=int, default=5,
                   help="wrong pickup codes in a row (driver keypad, key 5) before the keypad locks")
    p.add_argument("--pickup-lockout-seconds", type=int, default=300,
                   help="how long the keypad refuses pickup codes after too many wrong ones")
    p.add_argument("--printer-width", type=int, default=32, choices=(32, 48),
                   help="printer columns: 32 (58 mm paper) or 48 (80 mm)")
    p.add_argument("--tap", type=Path, nargs="+", action="extend", default=[], metavar="CARD_FILE",
                   help="with --reader sim: present these simulated cards (farebox sim card --state FILE) in turn, "
                        "then stop once every record is acknowledged (a trial without a bus)")
    p.add_argument("--trial-clock", type=_aware_time, default=None, metavar="ISO",
                   help="with --tap: the terminal's clock starts here (e.g. 2026-12-02T07:30:00+08:00) and moves "
                        "two minutes a card: a trial day that can be settled at once")
    p.set_defaults(func=run)


def _aware_time(text: str):
    from datetime import datetime

    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give an ISO time with its zone, e.g. 2026-12-02T07:30:00+08:00")
    return at


class _TrialClock:
    """The terminal's clock on a trial: from ``start``, ``step`` further on for every card presented."""

    def __init__(self, start, step):
        from datetime import UTC

        self._at = start.astimezone(UTC)
        self._step = step
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            return self._at

    def advance(self) -> None:
        with self._lock:
            self._at += self._step


def _present_cards(reader, app, journal, paths, settings, *, online: bool, clock, stop: threading.Event) -> None:
    """--tap: each simulated card in the reader's field until the validator has decided on it, then the next; at
    the end wait for the back office's acknowledgement of every record, and stop the validator."""
    from farebox.simcard import load_sim_card

    try:
        for path in paths:
            card = load_sim_card(path, settings)
            before = app.taps
            if clock is not None:
                clock.advance()
            reader.present(card)
            while app.taps == before and not stop.wait(0.02):
                pass
            reader.remove()
        if not online:
            print(f"all {len(paths)} card(s) tapped; offline: the journal keeps the records", flush=True)
        while online and not stop.is_set():
            usage = journal.usage()
            if usage.unsent == 0 and usage.set_aside == 0:
                print(f"all {len(paths)} card(s) tapped; every record acknowledged by the back office", flush=True)
                break
            stop.wait(0.2)
    except Exception:  # a card file that cannot be read: said, and the validator stops as after the last card
        log.exception("--tap: presenting the cards failed")
    finally:
        stop.set()


def _add_report_parser(actions) -> None:
    p = actions.add_parser("shift-report", help="reprint a driver's shift report from a validator's journal")
    p.add_argument("--journal", type=Path, required=True)
    p.add_argument("--shift", type=int, default=None, help="the shift number (default: the last shift)")
    p.add_argument("--width", type=int, default=32, help="printer columns (32 or 48 on bus printers)")
    p.add_argument("--tz", default="Asia/Shanghai")
    p.add_argument("--languages", default="zh,en", help="comma-separated, some of zh,en")
    p.add_argument("--printer", default=None, metavar="PATH",
                   help="also print it on an ESC/POS printer: serial:DEV[?baud=9600] (validator.printer)")
    p.set_defaults(func=shift_report)


def shift_report(args, _settings=None) -> int:
    from validator.journal import Journal, JournalError
    from validator.shift_report import render

    if not args.journal.exists():  # opening would create an empty journal where the clerk mistyped a path
        print(f"farebox validator shift-report: no journal at {args.journal}", file=sys.stderr)
        return 2
    try:
        journal = Journal(args.journal, budget_bytes=None)  # reading only: no budget to enforce
    except (OSError, JournalError) as e:
        print(f"farebox validator shift-report: cannot open {args.journal}: {e}", file=sys.stderr)
        return 2
    try:
        shift_no = args.shift if args.shift is not None else journal.last_shift_no()
        report = journal.shift_report(shift_no) if shift_no is not None else None
    finally:
        journal.close()
    if report is None:
        which = f"shift {args.shift}" if args.shift is not None else "any shift"
        print(f"farebox validator shift-report: {args.journal} holds no record of {which}", file=sys.stderr)
        return 1
    try:
        from datetime import UTC, datetime

        text = render(report, width=args.width, languages=tuple(args.languages.split(",")), tz=args.tz,
                      reprint=True, printed_at=datetime.now(UTC))
    except ValueError as e:
        print(f"farebox validator shift-report: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.printer:
        from validator.printer import PrinterError, open_printer

        try:
            printer = open_printer(args.printer)
        except PrinterError as e:
            print(f"farebox validator shift-report: {e}", file=sys.stderr)
            return 2
        printer.print_slip(text)
        printer.close(timeout=60)
        if printer.printed != 1:
            print(f"farebox validator shift-report: not printed on {args.printer} (see the log line above)",
                  file=sys.stderr)
            return 1
    return 0


def _psam_session(path: str, journal, settings=None):
    from validator.readers import ReaderError, open_reader

    scheme, _, rest = path.partition(":")
    if scheme == "sim":
        from farebox.simcard import sim_issuer_keys
        from hardware_sim.psam import SimPsam
        from validator.readers.sim import SimReader

        try:
            terminal_id = bytes.fromhex(rest)
        except ValueError:
            terminal_id = b""
        if len(terminal_id) != 6:
            raise ReaderError(f"--psam sim: needs the 12-hex-digit terminal number, got {rest!r}")
        used = [r.terminal_seq for r in journal.records_since(0)]
        slot = SimReader()
        slot.present(SimPsam(terminal_id, keys=sim_issuer_keys(settings), sequence=max(used, default=0) + 1))
        return slot.poll()
    session = open_reader(path).poll(timeout=5.0)
    if session is None:
        raise ReaderError(f"no PSAM answers in {path}: is it seated in its slot?")
    return session


def _hex_option(value: str | None, what: str, length: int) -> bytes | None:
    """A key given as hex or as @FILE holding hex; ValueError saying what is wrong."""
    if value is None:
        return None
    text = Path(value[1:]).read_text("ascii").strip() if value.startswith("@") else value.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{what} must be hex") from None
    if len(key) != length:
        raise ValueError(f"{what} must be {length} bytes ({2 * length} hex digits), not {len(key)}")
    return key


def test_keys_in_use(args, mac_key: bytes | None, signing_key: bytes | None, target, settings=None) -> list:
    """What of the published test keys this validator would run on (farebox.keys.TestKeyUse each)."""
    import dataclasses

    from epurse.keys import TEST_ISSUER_KEYS
    from farebox.keys import TestKeyUse
    from farebox.simcard import sim_issuer_keys
    from wire import devicekeys
    from wire.packages import TEST_PUBLIC_KEY

    uses = []
    published = set(dataclasses.astuple(TEST_ISSUER_KEYS))
    if args.psam.startswith("sim:") and published & set(dataclasses.astuple(sim_issuer_keys(settings))):
        uses.append(TestKeyUse("the PSAM's issuer keys", "seat a real PSAM (--psam pcsc:N | rfid24:DEV)",
                               f"--psam {args.psam} (a simulated PSAM)"))
    if target is None:
        return uses  # offline: no link, so no MAC key, broker password or packages are used
    test_mac = devicekeys.mac_key(devicekeys.TEST_DEVICE_MASTER, args.device)
    if mac_key is None or mac_key == test_mac:
        uses.append(TestKeyUse("the device's MAC key", "give --mac-key as `farebox device add` printed it",
                               None if mac_key is None else "--mac-key"))
    if target.password == devicekeys.mqtt_password(devicekeys.TEST_DEVICE_MASTER, args.device):
        uses.append(TestKeyUse("the device's broker password", "give the password `farebox device add` printed",
                               "--mqtt"))
    if signing_key is None or signing_key == TEST_PUBLIC_KEY:
        uses.append(TestKeyUse("the package-signing public key", "give --signing-public-key @signing.pub (from "
                               "`farebox keys init`)", None if signing_key is None else "--signing-public-key"))
    return uses


def run(args, settings=None) -> int:
    from blacklist.denylist import DenyList
    from validator.app import ValidatorApp
    from validator.display import ConsoleDisplay
    from validator.fares import FareError, FareTable
    from validator.journal import Journal, JournalError
    from validator.readers import ReaderError, open_reader
    from farebox import bootstrap
    from farebox.config import Settings
    from validator.terminal import Terminal, TerminalConfig

    staging = args.staging_dir or args.journal.parent / "staging"
    deny_file = args.deny_list or staging / "denylist.bin"
    try:
        mac_key = _hex_option(args.mac_key, "--mac-key", 32)
        signing_key = _hex_option(args.signing_public_key, "--signing-public-key", 32)
        target = None
        if args.mqtt:
            from dataclasses import replace

            from wire.mqtt_url import parse_mqtt_urls

            target = parse_mqtt_urls(args.mqtt)  # one URL, or a cluster's nodes
            if args.mqtt_password_file is not None:
                password = args.mqtt_password_file.read_text("utf-8").strip()
                target = [replace(t, password=password) for t in target]
        # the test-key rule before anything opens (farebox.bootstrap): StartRefused reaches farebox.cli.main
        bootstrap.check_test_keys(settings or Settings(),
                                  test_keys_in_use(args, mac_key, signing_key, target and target[0], settings))
        if (args.tap or args.trial_clock) and not args.reader.startswith("sim:"):
            raise ValueError("--tap and --trial-clock are for a trial on the in-process reader: give --reader sim:")
        if args.trial_clock and not args.tap:
            raise ValueError("--trial-clock goes with --tap (a real bus keeps real time)")
        missing = [str(p) for p in args.tap if not p.exists()]
        if missing:
            raise ValueError(f"--tap: no card file {', '.join(missing)}: make one with farebox sim card --state FILE")
        fares = FareTable.from_dict(json.loads(args.fares.read_text("utf-8")))
        deny = DenyList.load(deny_file) if deny_file.exists() else DenyList.empty()
        journal = Journal(args.journal, budget_bytes=args.journal_budget_mb * 1024 * 1024)
    except (OSError, ValueError, FareError, JournalError) as e:
        print(f"farebox validator: cannot start: {e}", file=sys.stderr)
        return 2
    try:
        psam = _psam_session(args.psam, journal, settings)
        reader = open_reader(args.reader)
        trial_clock = None
        if args.trial_clock is not None:
            from datetime import timedelta

            trial_clock = _TrialClock(args.trial_clock - timedelta(minutes=2), timedelta(minutes=2))
        terminal = Terminal(TerminalConfig(device_id=args.device, operator=args.operator, route=args.route,
                                           vehicle=args.vehicle, tz=args.tz,
                                           double_tap_seconds=args.double_tap_seconds),
                            journal=journal, psam=psam, fares=fares, deny_list=deny,
                            **({"clock": trial_clock} if trial_clock is not None else {}))
    except (ReaderError, ValueError) as e:
        journal.close()
        print(f"farebox validator: cannot start: {e}", file=sys.stderr)
        return 2
    from validator.tickets import TicketChecker

    try:
        tickets = TicketChecker(terminal, max_wrong_codes=args.pickup_max_wrong,
                                lockout_seconds=args.pickup_lockout_seconds)
        scanner = None
        if args.scanner:
            from validator.readers.qr import open_scanner

            scanner = open_scanner(args.scanner)
    except (ReaderError, ValueError) as e:
        reader.close()
        journal.close()
        print(f"farebox validator: cannot start: {e}", file=sys.stderr)
        return 2
    uplink = downlink = None
    if target is not None:
        from datetime import timedelta

        from validator.downlink import Downlink
        from validator.uplink import Uplink

        if signing_key is None:
            from wire.packages import TEST_PUBLIC_KEY

            signing_key = TEST_PUBLIC_KEY  # allowed above: --insecure-test-keys
        try:
            downlink = Downlink(terminal, public_key=signing_key, staging_dir=staging, deny_file=deny_file,
                                fares_file=args.fares, software=args.software_version,
                                denylist_max_age=timedelta(hours=args.denylist_max_age_hours))
        except OSError as e:
            journal.close()
            print(f"farebox validator: cannot start: staging folder {staging}: {e}", file=sys.stderr)
            return 2
        uplink = Uplink(journal, target, device_id=args.device, operator=args.operator, mac_key=mac_key,
                        terminal=terminal, downlink=downlink, software=downlink.software,
                        heartbeat_seconds=args.heartbeat_seconds)
        uplink.start()
    display = ConsoleDisplay(languages=tuple(args.languages.split(",")), tz=args.tz)
    try:
        position, movers = _where_the_bus_is(args, terminal)
    except (OSError, ValueError) as e:
        if uplink is not None:
            uplink.stop()
        reader.close()
        journal.close()
        print(f"farebox validator: cannot start: {e}", file=sys.stderr)
        return 2
    try:
        menu = _driver_menu(args, terminal, display, tickets)
    except ValueError as e:
        for mover in movers:
            mover.stop()
        if uplink is not None:
            uplink.stop()
        reader.close()
        journal.close()
        print(f"farebox validator: cannot start: {e}", file=sys.stderr)
        return 2
    app = ValidatorApp(terminal, reader, display, uplink=uplink, downlink=downlink, fares_file=args.fares,
                       deny_file=deny_file, position=position, menu=menu, scanner=scanner, tickets=tickets)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("validator %s on route %s: reader %s, PSAM %s, journal %s", args.device, args.route, args.reader,
             args.psam, args.journal)
    if args.tap:
        threading.Thread(target=_present_cards, name="trial-cards", daemon=True,
                         args=(reader, app, journal, args.tap, settings),
                         kwargs={"online": uplink is not None, "clock": trial_clock, "stop": stop}).start()
    try:
        app.run(stop)
    finally:
        for mover in movers:
            mover.stop()
        if menu is not None:
            menu.close()
        if uplink is not None:
            uplink.stop()
        if scanner is not None:
            scanner.close()
        reader.close()
        journal.close()
    print(f"validator {args.device} stopped after {app.taps} taps", flush=True)
    return 0


def _where_the_bus_is(args, terminal):
    """The bus's stop from ``--gps`` and ``--stop-button`` (validator.gps): a Position and its started sources."""
    if args.gps is None and args.stop_button is None:
        return None, []
    from validator.gps import GpsReceiver, Position, StopButton

    position, movers = Position(), []
    if args.gps is not None:
        device, _, baud = args.gps.partition(":")
        if not baud.isdigit() and baud:
            raise ValueError(f"--gps {args.gps}: the baud rate after ':' must be a number, e.g. /dev/ttyS2:9600")
        route = terminal.config.route
        movers.append(GpsReceiver(device, position, lambda: terminal.fares.stops.get(route, ()),
                                  baud=int(baud or 9600), radius_m=args.stop_radius).start())
        if not terminal.fares.stops.get(route):
            log.warning("--gps: the fare table has no stop coordinates for route %s: the GPS cannot place the bus "
                        "until a fare table with them arrives (the stop button still works)", route)
    if args.stop_button is not None:
        movers.append(StopButton(args.stop_button, position).start())
    return position, movers


def _driver_menu(args, terminal, display, tickets=None):
    """The driver menu from ``--keypad`` and ``--printer`` (validator.driver_menu); None with neither.
    ValueError for a path that is wrong or a keypad that cannot be opened."""
    if args.keypad is None and args.printer is None:
        return None
    from validator.driver_menu import DriverMenu, KeypadError, open_keypad
    from validator.printer import PrinterError, open_printer

    try:
        printer = open_printer(args.printer) if args.printer else None
        keypad = open_keypad(args.keypad) if args.keypad else None
    except (KeypadError, PrinterError) as e:
        raise ValueError(str(e)) from None

    def screen(lines: list[str]) -> None:
        display.stream.write("\n".join(lines) + "\n\n")
        display.stream.flush()

    return DriverMenu(terminal, keypad, printer, screen, languages=display.languages, tz=args.tz,
                      width=args.printer_width, tickets=tickets)
