"""The embedded MQTT broker: amqtt (pure Python, MQTT 3.1.1) in a child process on a loopback port.

farebox starts this when no broker URL is configured, so the demo needs nothing installed by hand.
Production uses Mosquitto (or a cluster) by URL; this is the default and the test double.

    with EmbeddedBroker(Path("var/broker")) as broker:
        url = broker.url                    # mqtt://farebox:<random>@127.0.0.1:<port>
        ...

How it is set up, and why (see PLATFORM.md, "MQTT brokers"):

- It always binds 127.0.0.1 and a port picked free beforehand (bind port 0, read it, close), because
  amqtt's default is 0.0.0.0:1883 and an in-process amqtt cannot report an OS-chosen port. The port is
  kept for the life of the object, so ``stop()``/``kill()`` then ``start()`` comes back on the same port.
- Anonymous access is OFF. amqtt marks anonymous sessions and never queues offline QoS 1/2 messages for
  them, even with clean_session=False. Every client logs in with a user name from the password file
  (``passwd`` in the state dir, ``user:argon2-hash`` lines, the format amqtt's FileAuthPlugin reads
  through pwdlib). The Argon2 cost is deliberately light: the broker is loopback-only, and each connect
  verifies one hash.
- It runs as ``python -m farebox.broker --config FILE`` in its own process, so it neither shares the GIL
  with the demo nor dies quietly inside it, and tests can SIGKILL and restart it. The child exits by
  itself when the parent process goes away. Output goes to ``broker.log`` in the state dir.
- amqtt keeps sessions in memory: after the broker process restarts, persistent sessions and the
  messages queued for offline subscribers are gone (clients re-subscribe on connect; the validator's
  journal, not the broker, is the outbox). Queued messages arrive with retain=1 (an amqtt quirk).
- No $SYS topics (the sys plugin is not loaded).
- Logins are checked before anything else happens. amqtt 0.12 looks up (and for a clean session deletes) the
  session of the client id a CONNECT names, and takes over a connected one, before it checks the password: a
  client with a wrong password could end ingest's session. Here the CONNECT is authenticated first and refused
  with "not authorised" before any session is touched (farebox.broker_amqtt).
- A device login (``devices=``, user name = device id) gets its device id as its client id, whatever it sent,
  as on Mosquitto's device listener (``use_username_as_clientid``): a bus cannot take over ``farebox_ingest``
  or another bus. The back office's users keep the client ids they send (several ingest workers, one user).
- A publish bigger than ``message_size_limit`` (farebox.broker_config.MESSAGE_SIZE_LIMIT, as in the Mosquitto
  files) is dropped, not passed on; QoS 1 is still acknowledged, as Mosquitto's ``message_size_limit`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

DEFAULT_USER = "farebox"
HOST = "127.0.0.1"
CONFIG_NAME = "broker.json"
PASSWD_NAME = "passwd"
LOG_NAME = "broker.log"
READY_NAME = "broker.ready"

# Light Argon2id parameters: ~1 ms per verify instead of ~100 ms with pwdlib's defaults.
_ARGON2_PARAMS = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}


class BrokerStartError(RuntimeError):
    """The broker process did not come up; the message carries the tail of its log."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def hash_password(password: str) -> str:
    """An Argon2id hash in the PHC string form amqtt's FileAuthPlugin (pwdlib) verifies."""
    from pwdlib.hashers.argon2 import Argon2Hasher

    return Argon2Hasher(**_ARGON2_PARAMS).hash(password)


def port_answers(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """An amqtt broker in a child process on 127.0.0.1, with password logins only.

    ``users`` maps user name to password; the first one is the default user whose URL ``start()``
    returns. Without ``users`` there is one user, ``farebox``, with a random password.
    """

    def __init__(self, state_dir: Path, users: dict[str, str] | None = None,
                 devices: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        if users is not None and not users:
            raise ValueError("users must name at least one user (or be None for the default user)")
        self._users: dict[str, str] = dict(users) if users else {DEFAULT_USER: secrets.token_urlsafe(18)}
        for name in self._users:
            _check_username(name)
        self.default_user = next(iter(self._users))
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._devices: set[str] = set()
        for device_id, password in (devices or {}).items():
            self.add_device(device_id, password)

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.state_dir / CONFIG_NAME

    @property
    def passwd_path(self) -> Path:
        return self.state_dir / PASSWD_NAME

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_NAME

    @property
    def ready_path(self) -> Path:
        return self.state_dir / READY_NAME

    # ------------------------------------------------------------------ users and URLs
    @property
    def users(self) -> dict[str, str]:
        """A copy of user name -> password."""
        return dict(self._users)

    def add_user(self, name: str, password: str) -> None:
        """Add (or change) a login; only before ``start()`` (or between ``stop()`` and ``start()``)."""
        if self.running:
            raise RuntimeError("add_user() must be called before start(): amqtt reads its password file at start")
        _check_username(name)
        if not isinstance(password, str) or not password:
            raise ValueError("password must be a non-empty string")
        self._users[name] = password

    def add_device(self, device_id: str, password: str) -> None:
        """Add a bus's login (user name = device id): its client id is always its device id. Before ``start()``."""
        from wire.topics import check_device_id

        check_device_id(device_id)
        if device_id in self._users and device_id not in self._devices:
            raise ValueError(f"{device_id!r} is a back-office user of this broker, not a device")
        self.add_user(device_id, password)
        self._devices.add(device_id)

    def url_for(self, username: str) -> str:
        """``mqtt://user:pass@127.0.0.1:PORT`` for one of the broker's users (after ``start()``)."""
        if self.port is None:
            raise RuntimeError("the broker has no port yet: call start() first")
        try:
            password = self._users[username]
        except KeyError:
            raise KeyError(f"no such broker user {username!r}; known: {sorted(self._users)}") from None
        return f"mqtt://{quote(username, safe='')}:{quote(password, safe='')}@{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The default user's URL."""
        return self.url_for(self.default_user)

    # ------------------------------------------------------------------ process
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> str:
        """Start the broker process and wait until its port accepts connections; return ``self.url``.

        Raises ``BrokerStartError`` with the tail of ``broker.log`` if it exits or does not answer in time.
        Calling it while running is a no-op.
        """
        if self.running:
            return self.url
        self._proc = None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.port is not None:  # a restart keeps its port: clients have its URL
            self._start_on_port(timeout)
            return self.url
        # a fresh port: another process may grab it between free_port() and the child's bind; try another
        for attempt in range(3):
            self.port = free_port()
            try:
                self._start_on_port(timeout)
                return self.url
            except BrokerStartError as exc:
                if attempt == 2 or not _address_in_use(str(exc)):
                    self.port = None
                    raise
        raise AssertionError("unreachable")

    def _start_on_port(self, timeout: float) -> None:
        self._write_files()
        self.ready_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- farebox.broker starting on {HOST}:{self.port} at {time.ctime()}\n".encode())
            log.flush()
            env = dict(os.environ)
            env.setdefault("PYTHONUNBUFFERED", "1")
            self._proc = subprocess.Popen(
                [
                    sys.executable, "-m", "farebox.broker",
                    "--config", str(self.config_path),
                    "--parent-pid", str(os.getpid()),
                    "--ready-file", str(self.ready_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C meant for the demo is handled by the demo, which stops us
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise BrokerStartError(
                    f"embedded MQTT broker exited with code {code} before answering on {HOST}:{self.port}"
                    f"; last lines of {self.log_path}:\n{self.log_tail()}"
                )
            # the child writes the ready file once amqtt's listener is bound (a bare TCP probe would
            # make amqtt log an error for the empty connection)
            if self.ready_path.exists():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerStartError(
                    f"embedded MQTT broker did not answer on {HOST}:{self.port} within {timeout:.0f} s"
                    f"; last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the broker and wait for it (SIGKILL after ``timeout`` s). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL the broker (a crash, for reliability tests). ``start()`` brings it back on the same port."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def restart(self, timeout: float = 20.0) -> str:
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; do not leave a broker behind
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<EmbeddedBroker {HOST}:{self.port} {state} in {self.state_dir}>"

    # ------------------------------------------------------------------ files
    def _write_files(self) -> None:
        lines = [f"{name}:{hash_password(pw)}" for name, pw in self._users.items()]
        _write_private(self.passwd_path, "\n".join(lines) + "\n")
        config = broker_config(self.port, self.passwd_path, devices=sorted(self._devices))
        _write_private(self.config_path, json.dumps(config, indent=2) + "\n")


def broker_config(port: int, passwd_file: Path, *, devices: list[str] | None = None,
                  message_size_limit: int | None = None) -> dict:
    """The amqtt broker configuration farebox uses (a dict for ``amqtt.broker.Broker``, plus farebox's own
    ``farebox`` section, which the child takes out before handing the rest to amqtt)."""
    from farebox.broker_config import MESSAGE_SIZE_LIMIT

    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
        # only our FileAuthPlugin: with AnonymousAuthPlugin(allow_anonymous) every session is marked anonymous
        # and gets no offline queue
        "plugins": {
            "farebox.broker_amqtt.DeviceAuthPlugin": {
                "password_file": str(passwd_file), "devices": list(devices or [])},
        },
        "farebox": {"message_size_limit": MESSAGE_SIZE_LIMIT if message_size_limit is None else message_size_limit},
    }


def _address_in_use(text: str) -> bool:
    text = text.lower()
    return "address already in use" in text or "errno 98" in text


def _check_username(name: str) -> None:
    if not isinstance(name, str) or not name or ":" in name or any(c.isspace() for c in name):
        raise ValueError(f"bad broker user name {name!r}: non-empty, no ':' and no white space")


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the child process
async def _serve(config: dict, parent_pid: int | None, ready_file: Path | None) -> None:
    from farebox.broker_amqtt import FareboxBroker

    config = dict(config)
    ours = config.pop("farebox", {})
    broker = FareboxBroker(config, message_size_limit=int(ours.get("message_size_limit", 2**28)))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log = logging.getLogger("farebox.broker")
    log.info("ready on %s (pid %s)", config["listeners"]["default"]["bind"], os.getpid())
    if ready_file is not None:
        ready_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("parent process %s is gone; stopping", parent_pid)
            break
    log.info("stopping")
    try:
        await asyncio.wait_for(broker.shutdown(), 5.0)
    except Exception:  # exiting anyway
        log.exception("unclean broker shutdown")
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farebox.broker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="JSON broker config (see broker_config())")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--ready-file", type=Path, default=None, help="written once the listener is bound")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)
    if not args.debug:
        # amqtt logs every connect/disconnect at INFO; keep the log for what matters
        logging.getLogger("amqtt").setLevel(logging.WARNING)
    config = json.loads(args.config.read_text(encoding="utf-8"))
    asyncio.run(_serve(config, args.parent_pid, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
