"""How a long-running back-office process (ingest, status consumer, publisher, scheduler) learns it must stop."""

from __future__ import annotations

import signal
import threading


def stop_requested() -> threading.Event:
    """An event that SIGTERM or SIGINT sets; the process waits on it, then stops its parts cleanly.
    Call it from the main thread (Python installs signal handlers only there)."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    return done
