"""``farebox desk``: the counter's reader for the back-office pages in this desk's browser (farebox/desk.py).

    farebox desk --reader pcsc:0 --origin https://backoffice.example [--port 8765] [--terminal-id HEX]

It prints the pairing code staff type into the card pages once ("Desk reader" box); ``--pairing-file FILE`` (or
``FAREBOX_DESK_PAIRING``) keeps one code across restarts. Registered in farebox/cli.py by ``register(sub)``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from farebox.desk import DEFAULT_PORT, DEFAULT_TERMINAL, Desk, make_server, new_pairing_code, origin_of


def _pairing(args) -> str:
    if os.environ.get("FAREBOX_DESK_PAIRING"):
        return os.environ["FAREBOX_DESK_PAIRING"].strip()
    if args.pairing_file:
        path = Path(args.pairing_file)
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        code = new_pairing_code()
        path.write_text(code + "\n")
        path.chmod(0o600)
        return code
    return new_pairing_code()


def _desk(args, settings) -> int:
    from validator.readers import ReaderError, open_reader

    try:
        origin = origin_of(args.origin)
    except ValueError as e:
        print(f"farebox desk: --origin: {e}", file=sys.stderr)
        return 2
    try:
        reader = open_reader(args.reader)
    except ReaderError as e:
        print(f"farebox desk: cannot open {args.reader}: {e}", file=sys.stderr)
        return 1
    code = _pairing(args)
    desk = Desk(reader, terminal_id=args.terminal_id)
    try:
        server = make_server(desk, origin=origin, pairing=code, port=args.port)
    except OSError as e:
        print(f"farebox desk: cannot listen on 127.0.0.1:{args.port}: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="desk-http", daemon=True)
    thread.start()
    print(f"desk reader {args.reader} for {origin} on http://127.0.0.1:{args.port}", flush=True)
    print(f"pairing code: {code}", flush=True)
    if args.ready_file:
        Path(args.ready_file).write_text(f"{args.port}\n")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    server.server_close()
    reader.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("desk", help="offer the counter's card reader to the back-office pages in this browser")
    p.add_argument("--reader", required=True, help="the desk reader, e.g. pcsc:0 or pcsc:ACR122")
    p.add_argument("--origin", required=True, help="the back office's address as the browser shows it, "
                                                   "e.g. https://backoffice.example")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"on 127.0.0.1 (default {DEFAULT_PORT})")
    p.add_argument("--terminal-id", default=DEFAULT_TERMINAL, help="the desk's terminal number (12 hex digits)")
    p.add_argument("--pairing-file", help="keep the pairing code in this file (made, mode 600, if missing)")
    p.add_argument("--ready-file", help="written once the agent listens (for scripts and tests)")
    p.set_defaults(func=_desk)
