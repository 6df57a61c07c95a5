"""Settings: environment variables ``FAREBOX_*``, or one TOML file named by ``FAREBOX_CONFIG``. Every setting has a
default that runs the demo with nothing configured, except the secrets (farebox.keys): outside ``farebox demo`` (and
the tests, and labs that say ``--insecure-test-keys`` / ``FAREBOX_INSECURE_TEST_KEYS=1``) a command that needs one
refuses to start on its published test value (farebox.bootstrap); ``farebox keys init`` makes a fresh set."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Settings:
    var_dir: Path = Path("var")
    database_url: str | None = None  # None: a SQLite file under var/
    mqtt_url: str | None = None  # None: an embedded broker started by the program
    # The secrets. None: the published test value, which only the demo, the tests and --insecure-test-keys accept.
    issuer_keys_file: Path | None = None  # test: the simulator's issuer keys (epurse.keys)
    device_master_key_file: Path | None = None  # test: wire.devicekeys.TEST_DEVICE_MASTER
    signing_key_file: Path | None = None  # test: wire.packages.TEST_SIGNING_SEED
    payment_public_key: str | None = None  # the payment platform's Ed25519 public key, 64 hex digits
    ticket_key_file: Path | None = None  # the ticket-signing Ed25519 seed, hex (test: backoffice.tickets.keys)
    ticket_key_id: int = 1  # the key id written in every ticket token (0..255; 0 is the published test key's)
    ticket_pickup_key_file: Path | None = None  # the pickup-code master secret, hex (each operator's key from it)
    insecure_test_keys: bool = False  # a lab's explicit "yes, the published test keys" (a banner says so)
    api_tokens_file: Path | None = None  # None: api-tokens.toml under var/ (backoffice.web.auth)
    denylist_rebuild_seconds: float = 30.0  # how often the publisher looks for cards newly lost/found (0: never)
    web_session_hours: float = 12.0  # a web page login lasts this long (backoffice.web.sessions)
    web_secure_cookies: bool | None = None  # None: Secure when the request came over https; 1 behind a TLS proxy
    sms_url: str | None = None  # the SMS gateway (backoffice.sms.gateway); None: no text is sent, only logged
    sms_account: str = "farebox"  # our account at the SMS gateway
    sms_secret: str | None = None  # the gateway's shared HMAC secret, hex (>= 16 bytes): signs both ways

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{(self.var_dir / 'backoffice.db').resolve()}"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or self.sqlite_url

    @property
    def tokens_path(self) -> Path:
        """The API and web-page token file."""
        return self.api_tokens_file or self.var_dir / "api-tokens.toml"


_ENV = {"var_dir": "FAREBOX_VAR_DIR", "database_url": "FAREBOX_DATABASE_URL", "mqtt_url": "FAREBOX_MQTT_URL",
        "issuer_keys_file": "FAREBOX_ISSUER_KEYS", "device_master_key_file": "FAREBOX_DEVICE_MASTER_KEY",
        "signing_key_file": "FAREBOX_SIGNING_KEY", "api_tokens_file": "FAREBOX_API_TOKENS",
        "payment_public_key": "FAREBOX_PAYMENT_PUBLIC_KEY", "insecure_test_keys": "FAREBOX_INSECURE_TEST_KEYS",
        "denylist_rebuild_seconds": "FAREBOX_DENYLIST_REBUILD_SECONDS", "web_session_hours": "FAREBOX_WEB_SESSION_HOURS",
        "web_secure_cookies": "FAREBOX_WEB_SECURE_COOKIES", "ticket_key_file": "FAREBOX_TICKET_KEY",
        "ticket_key_id": "FAREBOX_TICKET_KEY_ID", "ticket_pickup_key_file": "FAREBOX_TICKET_PICKUP_KEY",
        "sms_url": "FAREBOX_SMS_URL", "sms_account": "FAREBOX_SMS_ACCOUNT", "sms_secret": "FAREBOX_SMS_SECRET"}


def load_settings(environ=os.environ) -> Settings:
    values: dict = {}
    config_file = environ.get("FAREBOX_CONFIG")
    if config_file:
        with open(config_file, "rb") as f:
            doc = tomllib.load(f)
        unknown = set(doc) - set(_ENV)
        if unknown:
            raise ValueError(f"{config_file}: unknown settings {sorted(unknown)}; known: {sorted(_ENV)}")
        values.update(doc)
    for name, var in _ENV.items():
        if environ.get(var):
            values[name] = environ[var]
    for name in ("var_dir", "issuer_keys_file", "device_master_key_file", "signing_key_file", "api_tokens_file",
                 "ticket_key_file", "ticket_pickup_key_file"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    if values.get("denylist_rebuild_seconds") is not None:
        values["denylist_rebuild_seconds"] = _seconds(values["denylist_rebuild_seconds"],
                                                      _ENV["denylist_rebuild_seconds"])
    if values.get("ticket_key_id") is not None:
        text = str(values["ticket_key_id"]).strip()
        if not text.isdigit() or not 0 <= int(text) <= 255:
            raise ValueError(f"{_ENV['ticket_key_id']} is {values['ticket_key_id']!r}: give the ticket key's id, a "
                             "whole number 0..255 (e.g. 1; raise it when you change the key)")
        values["ticket_key_id"] = int(text)
    values["insecure_test_keys"] = _yes(values.get("insecure_test_keys", False), _ENV["insecure_test_keys"])
    if values.get("web_session_hours") is not None:
        try:
            hours = float(values["web_session_hours"])
        except (TypeError, ValueError):
            hours = -1.0
        if not 0 < hours <= 24 * 31:
            raise ValueError(f"{_ENV['web_session_hours']} is {values['web_session_hours']!r}: give the hours a web "
                             "page login lasts, more than 0 and at most 744 (e.g. 12)")
        values["web_session_hours"] = hours
    secure = values.get("web_secure_cookies")
    if secure is not None:
        values["web_secure_cookies"] = None if str(secure).strip().lower() in ("auto", "") else \
            _yes(secure, _ENV["web_secure_cookies"])
    return Settings(**values)


def _yes(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} is {value!r}: give 1 (yes) or 0 (no)")


def _seconds(value, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is {value!r}: give a number of seconds (e.g. 30; 0 turns it off)") from None
    if not 0 <= seconds <= 86400:
        raise ValueError(f"{name} is {value!r}: give 0 to 86400 seconds")
    return seconds
