"""Storing a group of tap messages: one transaction for the group, else one per message.

What both ingest transports do between receiving and acknowledging (backoffice.ingest_consumer for MQTT,
backoffice.ingest_jetstream for a NATS cluster): :func:`store` commits the messages together through
:meth:`backoffice.ingest.Ingest.messages`; if that transaction fails (a deadlock, the database gone for a moment, one
poison message), each message gets a transaction of its own, so one cannot hold back the others. A message that still
fails is logged and comes back as ``None``: the caller does not acknowledge it, and it arrives again (the validator
resends it, or JetStream redelivers it). Acknowledging is the caller's, after this returns: nothing is acknowledged
before its commit.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from backoffice.ingest import Ingest, IngestResult

log = logging.getLogger(__name__)

COUNTS = ("messages", "transactions", "stored", "duplicates", "quarantined", "fraud", "refused", "errors")


def new_counts() -> dict[str, int]:
    return dict.fromkeys(COUNTS, 0)


def commit(engine: Engine, ingest: Ingest, counts: dict, messages: list[tuple[str, bytes]]) -> list[IngestResult]:
    """Store ``messages`` (topic, payload) in one transaction and commit it; raises if it fails."""
    with engine.begin() as conn:  # commits on leaving the block
        results = ingest.messages(conn, messages)
    counts["transactions"] += 1
    return results


def store(engine: Engine, ingest: Ingest, counts: dict, messages: list[tuple[str, bytes]], *, name: str = "ingest",
          again: str = "the device will send it again") -> list[IngestResult | None]:
    """Commit the messages together; if that fails, each in a transaction of its own. One result per message,
    ``None`` for a message that could not be stored (logged with ``again``: who brings it back)."""
    try:
        return commit(engine, ingest, counts, messages)
    except Exception:  # noqa: BLE001 - logged below; the message comes again
        if len(messages) == 1:
            _failed(counts, messages[0][0], name, again)
            return [None]
        log.warning("%s: %d messages failed together; storing them one by one", name, len(messages), exc_info=True)
    results: list[IngestResult | None] = []
    for message in messages:
        try:
            results.extend(commit(engine, ingest, counts, [message]))
        except Exception:  # noqa: BLE001 - logged in _failed; the message comes again
            _failed(counts, message[0], name, again)
            results.append(None)
    return results


def count(counts: dict, result: IngestResult) -> None:
    """Add a stored message's outcome to ``counts`` (when it is acknowledged)."""
    counts["messages"] += 1
    counts["stored"] += result.stored
    counts["duplicates"] += result.duplicates
    counts["quarantined"] += result.quarantined
    counts["fraud"] += result.fraud
    counts["refused"] += result.refused is not None


def _failed(counts: dict, topic: str, name: str, again: str) -> None:
    counts["errors"] += 1
    log.exception("%s: batch on %s not stored; %s", name, topic, again)
