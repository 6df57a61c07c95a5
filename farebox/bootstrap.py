"""The composition root: what every entry point (the ``farebox`` subcommands, ``farebox serve``) is built from.

``start(settings, "issuer", "device_master", ...)`` is a command's first line. It loads the secrets the command
will use, all of them before anything starts, and applies the test-key rule once: a published test key
(farebox.keys) is refused, naming every setting to give, unless ``settings.insecure_test_keys``, and then a banner
on stderr says the command runs on keys anyone can read. The :class:`Root` it returns hands out the engine (a
write command migrates the schema as it always did; a read-only one never does, and says so when the schema is
behind), the secrets it loaded and the broker target.

Errors a command cannot start with are :class:`StartRefused`; ``farebox.cli.main`` prints them and exits 2.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from farebox import keys
from farebox.config import Settings


class StartRefused(Exception):
    """The command does not start; the message says why and what to do."""


class TestKeysRefused(StartRefused):
    """Published test keys, and no ``--insecure-test-keys``."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, uses: list[keys.TestKeyUse]):
        self.uses = uses
        super().__init__(refusal(uses))


class SchemaBehind(StartRefused):
    """A read-only command on a database whose schema is not this farebox's."""


def refusal(uses: list[keys.TestKeyUse]) -> str:
    lines = ["refusing to start on published TEST keys (they are in farebox's source: anyone can forge with them):"]
    lines += [f"  - {u.line()}" for u in uses]
    lines += ["`farebox keys init --out DIR` makes a fresh set and prints the settings lines to use.",
              "A lab or a bench that means it: farebox --insecure-test-keys ... (or FAREBOX_INSECURE_TEST_KEYS=1)."]
    return "\n".join(lines)


def banner(uses: list[keys.TestKeyUse], stream=None) -> None:
    """The loud notice of a run on test keys (stderr): nobody should mistake a lab for production."""
    stream = stream or sys.stderr
    bar = "!" * 100
    print(bar, file=stream)
    print("!!  INSECURE: running on PUBLISHED TEST KEYS (--insecure-test-keys). Anyone can forge with these:",
          file=stream)
    for u in uses:
        print(f"!!    {u.what}", file=stream)
    print("!!  Never for real cards, buses or payments: `farebox keys init --out DIR` makes a fresh set.", file=stream)
    print(bar, file=stream, flush=True)


def check_test_keys(settings: Settings, uses: list[keys.TestKeyUse], *, announce: bool = True) -> None:
    """The test-key rule: refuse ``uses`` unless the settings allow test keys, then print the banner."""
    if not uses:
        return
    if not settings.insecure_test_keys:
        raise TestKeysRefused(uses)
    if announce:
        banner(uses)


def start(settings: Settings, *needs: str, announce: bool = True) -> Root:
    """The root for a command that uses the secrets ``needs`` (keys of farebox.keys.SECRETS), checked once.
    ``announce=False``: no banner (the demo, which exists to run on the test keys)."""
    from backoffice.keyservice import KeyFileError

    loaded: dict = {}
    uses: list[keys.TestKeyUse] = []
    for kind in needs:
        try:
            loaded[kind], use = keys.LOADERS[kind](settings)
        except (OSError, ValueError, KeyFileError) as e:  # missing, unreadable, malformed, wrong passphrase
            secret = keys.SECRETS[kind]
            raise StartRefused(f"{secret.what} ({secret.env}, TOML {secret.toml}): {e}") from None
        if use is not None:
            uses.append(use)
    check_test_keys(settings, uses, announce=announce)
    return Root(settings, loaded)


@dataclasses.dataclass
class Root:
    settings: Settings
    _secrets: dict = dataclasses.field(default_factory=dict)
    _engine: object = None

    def _secret(self, kind: str):
        if kind not in self._secrets:  # a command that did not say it needs this one: same rule, checked now
            self._secrets.update(start(self.settings, kind)._secrets)
        return self._secrets[kind]

    @property
    def key_service(self):
        return self._secret("issuer")

    @property
    def device_master(self) -> bytes:
        return self._secret("device_master")

    @property
    def signing_seed(self) -> bytes:
        return self._secret("signing")

    @property
    def payment_public_key(self) -> bytes:
        return self._secret("payment")

    @property
    def ticket_keys(self):
        """The ticket keys (backoffice.tickets.keys.TicketKeys): the signing seed and its id ("ticket"), the
        pickup-code master ("pickup"); a command that sells or publishes tickets says it needs both."""
        seed, key_id = self._secret("ticket")
        return keys.make_ticket_keys(seed, key_id, self._secret("pickup"), "the settings")

    def broker_target(self):
        """The broker the settings name (wire.mqtt_url.MqttTarget), or None: the embedded one."""
        from wire.mqtt_url import parse_mqtt_url

        return parse_mqtt_url(self.settings.mqtt_url) if self.settings.mqtt_url else None

    def engine(self):
        """The database, its schema brought to this farebox's (write commands, as they always did)."""
        if self._engine is None:
            from backoffice.db import make_engine, upgrade

            self._engine = make_engine(self.settings.effective_database_url)
            upgrade(self._engine)
        return self._engine

    def read_engine(self):
        """The database for a command that only reads: never migrated; refused when its schema is not this farebox's
        (a reader must not change a production schema behind the operator's back)."""
        if self._engine is None:
            self._engine = read_engine(self.settings)
        return self._engine


def read_engine(settings: Settings):
    from backoffice.db import make_engine

    url = settings.effective_database_url
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        path = make_url(url).database
        if path and path != ":memory:" and not Path(path).exists():
            raise SchemaBehind(f"there is no database at {path} yet: run `farebox db upgrade`")
    engine = make_engine(url)
    current, wanted = schema_heads(engine)
    if current != wanted:
        engine.dispose()
        have = ", ".join(sorted(current)) or "nothing (an empty database)"
        need = ", ".join(sorted(wanted))
        if current - known_revisions(url):
            raise SchemaBehind(f"the schema is at {have}, newer than this farebox knows ({need}): run the farebox "
                               "that upgraded it")
        raise SchemaBehind(f"the schema is at {have}, this farebox needs {need}: run `farebox db upgrade`")
    return engine


def schema_heads(engine) -> tuple[set[str], set[str]]:
    """(the revisions the database is at, the heads this farebox's migrations end in)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from backoffice.db import alembic_config

    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    script = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(hide_password=False)))
    return current, set(script.get_heads())


def known_revisions(url: str) -> set[str]:
    from alembic.script import ScriptDirectory

    from backoffice.db import alembic_config

    return {r.revision for r in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()}
