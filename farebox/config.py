"""Settings: environment variables ``FAREBOX_*``, or one TOML file named by ``FAREBOX_CONFIG``; every setting has a
default that runs the demo with nothing configured."""

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
    issuer_keys_file: Path | None = None  # None: the published simulator test keys (epurse.keys)
    device_master_key_file: Path | None = None  # None: the published test device master (wire.devicekeys)
    signing_key_file: Path | None = None  # None: the published test package-signing key (farebox.keys)
    api_tokens_file: Path | None = None  # None: api-tokens.toml under var/ (backoffice.web.auth)

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
        "signing_key_file": "FAREBOX_SIGNING_KEY", "api_tokens_file": "FAREBOX_API_TOKENS"}


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
    for name in ("var_dir", "issuer_keys_file", "device_master_key_file", "signing_key_file", "api_tokens_file"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    return Settings(**values)
