"""The issuer's master keys for the back office: from the key file named by FAREBOX_ISSUER_KEYS, or, when none is
named, the simulator's published test keys (epurse.keys), which only ever open simulated cards."""

from __future__ import annotations

import logging
import tomllib

from epurse.keys import TEST_ISSUER_KEYS, IssuerKeys
from farebox.config import Settings

log = logging.getLogger(__name__)


def issuer_keys(settings: Settings) -> IssuerKeys:
    if settings.issuer_keys_file is None:
        log.warning("using the published issuer TEST keys: fine for simulated cards, never for real ones")
        return TEST_ISSUER_KEYS
    with open(settings.issuer_keys_file, "rb") as f:
        doc = tomllib.load(f)
    try:
        return IssuerKeys(**{name: bytes.fromhex(doc[name]) for name in ("purchase", "load", "tac", "maintenance")})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{settings.issuer_keys_file}: needs purchase, load, tac and maintenance as 32 hex "
                         f"digits each ({e})") from None
