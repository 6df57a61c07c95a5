"""Shared fixtures: real PostgreSQL, real Mosquitto, the embedded amqtt broker, SQLite files, unique ids.

Services come from ``scripts/ensure-services.sh`` (``make test`` runs it). A test that needs a service
that does not answer is skipped with a plain reason, never failed.

| fixture | scope | gives |
|---|---|---|
| ``pg_url`` | session | ``postgresql+psycopg://postgres@127.0.0.1:5432/test`` (or ``$FAREBOX_TEST_PG_URL``) |
| ``pg_schema_url`` | function | URL of a fresh, empty database ``farebox_t_<pid>_<hex>``, dropped afterwards |
| ``mosquitto_url`` | session | ``mqtt://127.0.0.1:1883`` (or ``$FAREBOX_TEST_MQTT_URL``) |
| ``embedded_broker`` | function | a started ``farebox.broker.EmbeddedBroker`` in ``tmp_path``; ``.url`` |
| ``broker_url`` | function | parametrised: the embedded broker's URL, then Mosquitto's |
| ``sqlite_url`` | function | ``sqlite:///<tmp_path>/backoffice.db`` |
| ``uid`` | function | 10 random hex digits, for topic prefixes and client ids on the shared Mosquitto |

Tests using ``pg_url``/``pg_schema_url`` get the ``postgres`` mark and tests using ``mosquitto_url`` the
``mosquitto`` mark, so ``pytest -m "not postgres"`` works without marking by hand.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from farebox.broker import EmbeddedBroker
from wire.mqtt_url import parse_mqtt_url

# The suite runs on the published test keys: say so to every farebox it runs, in process (load_settings) and as a
# child process (inherited environment). tests/integration/test_test_keys.py checks the refusal without it.
os.environ.setdefault("FAREBOX_INSECURE_TEST_KEYS", "1")

# Property tests: `make test` is the gate CI runs, so its examples are the same on every run (a fixed seed per test,
# no example database); `make soak` (FAREBOX_SOAK=1) explores new random examples, where a new find belongs.
settings.register_profile("farebox", derandomize=os.environ.get("FAREBOX_SOAK") != "1", database=None)
settings.load_profile("farebox")

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
TEST_DB_PREFIX = "farebox_t_"


def _libpq_url(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql://...`` for psycopg.connect()."""
    scheme, sep, rest = sqlalchemy_url.partition("://")
    return scheme.split("+", 1)[0] + sep + rest


def _with_database(url: str, dbname: str) -> str:
    """The same server URL with another database name (query string kept)."""
    base, q, query = url.partition("?")
    head, _, _old = base.rpartition("/")
    if "://" not in head:  # no database in the URL at all
        head = base
    return f"{head}/{dbname}" + (q + query if q else "")


def _tcp_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _service_missing(reason: str):
    """Skip with the reason; under CI (FAREBOX_REQUIRE_SERVICES=1, set by .ci/run) a missing service fails."""
    if os.environ.get("FAREBOX_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (CI requires it)", pytrace=False)
    pytest.skip(reason)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def pg_url() -> str:
    """A PostgreSQL URL (SQLAlchemy form) that answers and logs in; skips the test otherwise."""
    url = os.environ.get("FAREBOX_TEST_PG_URL", DEFAULT_PG_URL)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        pytest.skip("psycopg is not installed")
    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=3, autocommit=True) as conn:
            _drop_orphan_test_databases(conn)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _service_missing(f"PostgreSQL not reachable at {url}: run scripts/ensure-services.sh ({reason})")
    return url


def _drop_orphan_test_databases(conn) -> None:
    """Drop per-test databases left behind by test processes on this machine that no longer exist."""
    import psycopg

    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s", (TEST_DB_PREFIX + "%",)
    ).fetchall()
    for (name,) in rows:
        parts = name[len(TEST_DB_PREFIX):].split("_")
        if len(parts) == 2 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            with contextlib.suppress(psycopg.Error):  # another run may be dropping it too
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """A fresh empty database on the test server for this one test; dropped afterwards.

    Named ``farebox_t_<pid>_<hex>`` (created from template0). Yields the URL in the same form as
    ``pg_url`` (``postgresql+psycopg://.../farebox_t_...``).
    """
    import psycopg

    name = f"{TEST_DB_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    admin_url = _libpq_url(pg_url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    try:
        yield _with_database(pg_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------- MQTT
@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    """The machine's Mosquitto (``$FAREBOX_TEST_MQTT_URL``, default mqtt://127.0.0.1:1883); skips if down."""
    url = os.environ.get("FAREBOX_TEST_MQTT_URL", DEFAULT_MQTT_URL)
    target = parse_mqtt_url(url)
    if not _tcp_answers(target.host, target.port):
        _service_missing(
            f"Mosquitto not reachable at {target.url(with_password=False)}: run scripts/ensure-services.sh"
        )
    return url


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A started embedded amqtt broker (own process, 127.0.0.1, free port, user ``farebox``); stopped after."""
    broker = EmbeddedBroker(tmp_path / "broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Run the test once against the embedded amqtt broker and once against Mosquitto."""
    if request.param == "embedded":
        return request.getfixturevalue("embedded_broker").url
    return request.getfixturevalue("mosquitto_url")


# ---------------------------------------------------------------------- files and names
@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file URL in this test's tmp_path."""
    return f"sqlite:///{tmp_path}/backoffice.db"


@pytest.fixture
def uid() -> str:
    """10 random hex digits: prefix topics and client ids with it so runs on the shared Mosquitto never collide."""
    return secrets.token_hex(5)


# ---------------------------------------------------------------------- marks
_MARK_BY_FIXTURE = {"pg_url": "postgres", "pg_schema_url": "postgres", "mosquitto_url": "mosquitto"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, mark in _MARK_BY_FIXTURE.items():
            if fixture in names:
                item.add_marker(mark)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("broker_url") == "mosquitto":
            item.add_marker("mosquitto")
