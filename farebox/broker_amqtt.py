"""What farebox adds to amqtt 0.12 inside the embedded broker's process (farebox.broker runs it; only that child
process and tests import this module, so the rest of farebox never imports amqtt).

- ``DeviceAuthPlugin``: amqtt's password file check, and a device login's client id set to its device id, whatever
  the CONNECT said, as Mosquitto's ``use_username_as_clientid`` does on the device listener of the files
  ``farebox broker config`` writes. A bus cannot take over ``farebox_ingest``'s session, nor another bus's.
- Login first: amqtt 0.12 looks up the session a CONNECT names (deleting it for a clean session) and takes over a
  connected one BEFORE it checks the password, so a client with a wrong password could end ingest's session.
  ``FareboxBroker`` reads CONNECTs through ``_LoginFirstHandler``, which authenticates first and answers "not
  authorised" before any session is touched.
- A message size limit: a publish bigger than ``message_size_limit`` is acknowledged and dropped, as Mosquitto's
  ``message_size_limit`` does.

These lean on two amqtt internals (``BrokerProtocolHandler.init_from_connect`` as ``amqtt.broker`` calls it, and
``Broker._handle_message_delivery``); pyproject pins amqtt below 0.13, and tests/integration/test_broker_logins.py
fails if either stops being called.
"""

from __future__ import annotations

import dataclasses
import logging

import amqtt.broker
from amqtt.broker import Broker
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.authentication import FileAuthPlugin

log = logging.getLogger("farebox.broker")


class DeviceAuthPlugin(FileAuthPlugin):
    """The password file, and devices' client ids tied to their device ids."""

    @dataclasses.dataclass
    class Config:
        password_file: str | None = None
        devices: list[str] = dataclasses.field(default_factory=list)
        """user names that are devices: their session is their device id"""

    async def authenticate(self, *, session):
        ok = await super().authenticate(session=session)
        if ok and session is not None and session.username in self.config.devices:
            if session.client_id != session.username:
                log.info("device %s connected with client id %r: its session is its device id",
                         session.username, session.client_id)
                session.client_id = session.username
        return ok


class _LoginFirstHandler(BrokerProtocolHandler):
    """Reads the CONNECT as amqtt does, then authenticates it before the broker looks up, deletes or takes over any
    session: a refused login is answered "not authorised" and touches nothing."""

    @classmethod
    async def init_from_connect(cls, reader, writer, plugins_manager, loop=None):
        handler, session = await super().init_from_connect(reader, writer, plugins_manager, loop=loop)
        returns = await plugins_manager.map_plugin_auth(session=session)
        results = [r for r in (returns or {}).values() if r is not None]
        if not results or not all(results):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"login refused for user {session.username!r} (client id {session.client_id!r})")
        return handler, session


class FareboxBroker(Broker):
    """amqtt's broker, logins checked first, with a message size limit."""

    def __init__(self, config: dict, *, message_size_limit: int) -> None:
        # amqtt.broker reads every CONNECT through this name; the broker's process runs nothing else
        amqtt.broker.BrokerProtocolHandler = _LoginFirstHandler
        super().__init__(config)
        self.message_size_limit = message_size_limit

    async def _handle_message_delivery(self, client_session, handler, wait_deliver):
        message = wait_deliver.result()
        size = len(message.data or b"") if message is not None else 0
        if size > self.message_size_limit:
            log.warning("dropped a %d-byte message from %s on %r: over the %d-byte limit", size,
                        client_session.client_id, message.topic, self.message_size_limit)
            return True  # True: the client stays connected
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)
