"""MQTT broker URLs: ``mqtt://[user[:pass]@]host[:port]`` and ``mqtts://...``.

One URL names a broker everywhere in farebox (``FAREBOX_MQTT_URL``, the embedded broker's
``EmbeddedBroker.start()``, test fixtures). User name and password are percent-decoded, so a
password containing ``@``, ``:`` or ``/`` must be written percent-encoded (``%40``, ``%3A``, ``%2F``).

>>> parse_mqtt_url("mqtt://bus-0042:s3cret@broker.example:1884")
MqttTarget(host='broker.example', port=1884, username='bus-0042', password='***', tls=False)
>>> parse_mqtt_url("mqtts://broker.example").port
8883
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    import paho.mqtt.client

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class MqttTarget:
    """Where a broker is and how to log in to it."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def __repr__(self) -> str:  # never print a password into a log
        return (
            f"MqttTarget(host={self.host!r}, port={self.port!r}, username={self.username!r}, "
            f"password={'***' if self.password else None!r}, tls={self.tls!r})"
        )

    def url(self, *, with_password: bool = True) -> str:
        """The URL back (user name and password percent-encoded); ``with_password=False`` for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username is not None:
            auth = quote(self.username, safe="")
            if self.password is not None:
                auth += ":" + (quote(self.password, safe="") if with_password else "***")
            auth += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttTarget:
    """Parse a broker URL; raise ``ValueError`` saying what is wrong with anything else.

    Accepted: scheme ``mqtt`` (plain TCP, default port 1883) or ``mqtts`` (TLS, default port 8883), an
    optional ``user[:password]@``, a host name or address (IPv6 in brackets), an optional port, and at
    most a trailing ``/``. Paths, queries and fragments are refused rather than silently ignored.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"MQTT URL must be a non-empty string like mqtt://host:1883, got {url!r}")
    text = url.strip()
    if "://" not in text:
        raise ValueError(f"MQTT URL {_safe(text)!r} has no scheme: write mqtt://host[:port] or mqtts://host[:port]")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"MQTT URL {_safe(text)!r} is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"MQTT URL {_safe(text)!r} has scheme {parts.scheme!r}; only mqtt:// and mqtts:// are supported"
        )
    if parts.path not in ("", "/"):
        raise ValueError(f"MQTT URL {_safe(text)!r} has a path {parts.path!r}; a broker URL has none")
    if parts.query or parts.fragment:
        raise ValueError(f"MQTT URL {_safe(text)!r} has a query or fragment; a broker URL has none")
    host = parts.hostname
    if not host:
        raise ValueError(f"MQTT URL {_safe(text)!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"MQTT URL {_safe(text)!r} has a bad port (must be 1-65535)") from None
    if port is None:
        # urlsplit accepts "host:" with an empty port; treat that as a mistake, not as the default
        if parts.netloc.endswith(":"):
            raise ValueError(f"MQTT URL {_safe(text)!r} has an empty port")
        port = DEFAULT_PORTS[scheme]
    elif port == 0:
        raise ValueError(f"MQTT URL {_safe(text)!r} has port 0 (must be 1-65535)")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if username == "":
        if password:
            raise ValueError(f"MQTT URL {_safe(text)!r} has a password but no user name")
        username = None
        password = None
    return MqttTarget(host=host, port=port, username=username, password=password, tls=scheme == "mqtts")


def configure_client(
    client: paho.mqtt.client.Client,
    target: MqttTarget | str,
    *,
    ca_certs: str | None = None,
    insecure: bool = False,
) -> MqttTarget:
    """Set user name/password and TLS on a paho client for ``target`` (an ``MqttTarget`` or URL).

    Call before ``client.connect(target.host, target.port)``. For ``mqtts`` the system CA store is used
    unless ``ca_certs`` names a PEM file; ``insecure=True`` skips certificate and host-name checks (tests
    against self-signed brokers only). Returns the target, so
    ``t = configure_client(c, url); c.connect(t.host, t.port)`` reads well.
    """
    if isinstance(target, str):
        target = parse_mqtt_url(target)
    if target.username is not None:
        client.username_pw_set(target.username, target.password)
    if target.tls:
        client.tls_set(ca_certs=ca_certs, cert_reqs=ssl.CERT_NONE if insecure else ssl.CERT_REQUIRED)
        if insecure:
            client.tls_insecure_set(True)
    return target


def _safe(text: str) -> str:
    """The URL with any password masked, for error messages."""
    try:
        parts = urlsplit(text)
        if parts.password:
            return text.replace(":" + parts.password + "@", ":***@", 1)
    except ValueError:
        pass
    return text


def new_client(target: MqttTarget, client_id: str, *, persistent: bool = True, max_inflight: int = 20):
    """A paho 2.x client for ``target``, MQTT 3.1.1 (what every farebox broker speaks), logged in, not connected.

    ``persistent`` asks the broker to keep the session (subscriptions and QoS 1 messages queued while the client is
    away) under ``client_id``: both ends of the tap link rely on it.
    """
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
                         protocol=mqtt.MQTTv311)
    configure_client(client, target)
    client.max_inflight_messages_set(max_inflight)  # before connecting, or paho ignores it
    return client


def parse_mqtt_urls(value: str | list[str] | tuple[str, ...]) -> list[MqttTarget]:
    """A list of broker URLs (the nodes of a cluster): ``"mqtt://a:1883,mqtt://b:1883"``, a list of such strings
    (a repeated ``--mqtt``), or both. A validator connects to the first and fails over to the next when its node
    dies. Raises ``ValueError`` for an empty list or a bad URL (the message names it, password masked).

    >>> [t.port for t in parse_mqtt_urls(["mqtt://a:1", "mqtt://b:2,mqtt://c:3"])]
    [1, 2, 3]
    """
    items = [value] if isinstance(value, str) else list(value)
    urls = [u.strip() for item in items for u in str(item).split(",") if u.strip()]
    if not urls:
        raise ValueError("no broker URL given: write mqtt://host[:port], or several separated by commas")
    return [parse_mqtt_url(u) for u in urls]
