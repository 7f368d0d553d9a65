"""The embedded Kafka-protocol broker (noida-db's Kafka service) for the demo and the tests.

Found in the installed `noida-db` package, started on a free port with its own data directory,
ready once a metadata request succeeds, stopped with SIGTERM (then SIGKILL) on exit. Production
deployments point logstream at Apache Kafka instead; nothing else changes.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient

from logstream.logs import get_logger

log = get_logger(__name__)


class BrokerError(RuntimeError):
    pass


class _ExitedEarly(BrokerError):
    """The broker process exited before it was ready (on a port it could not bind, most often)."""


def broker_binary() -> Path:
    """Path of the noida-db executable inside its installed package."""
    spec = importlib.util.find_spec("noida_db")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("the embedded broker needs the noida-db package: pip install noida-db")
    binary = Path(next(iter(spec.submodule_search_locations))) / "noida-db"
    if not binary.is_file():
        raise BrokerError(f"noida-db binary not found at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


def _die_with_parent() -> None:
    """Linux: the broker gets SIGTERM when the process (thread) that started it dies, even by SIGKILL,
    so a killed test run or demo never leaves a broker behind. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_EPHEMERAL_DEFAULT = (32768, 60999)  # Linux's default ip_local_port_range
_LISTEN_FLOOR = 10_000  # listening ports are picked above this and below the ephemeral range
_PICK = random.SystemRandom()  # not the global generator: a test seeding it must not make workers pick alike


def _ephemeral_range() -> tuple[int, int]:
    """The range outgoing connections take their local ports from (Linux: ip_local_port_range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT


def free_port() -> int:
    """A port nothing listens on now, picked at random below the ephemeral range when there is room.

    A port the OS hands out for `bind(0)` comes from the ephemeral range, where any outgoing
    connection (a Kafka client's, in the next test) may take it before the broker binds it; random
    picks below that range only collide with another listener picking the same port, which
    `EmbeddedBroker.start` survives by retrying on a new port."""
    low, _ = _ephemeral_range()
    for _ in range(50):
        port = _PICK.randrange(_LISTEN_FLOOR, low) if low > _LISTEN_FLOOR + 1000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise BrokerError("no free TCP port found")


def _listening_inodes(port: int) -> set[str] | None:
    """Inodes of the TCP sockets listening on `port` (Linux: /proc/net/tcp and tcp6); None without /proc."""
    found: set[str] = set()
    tables = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(fields[9])
    return found if tables else None


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    """Whether process `pid` has one of the socket `inodes` open."""
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


class EmbeddedBroker:
    """A single-node Kafka-protocol broker in a child process."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None, host: str = "127.0.0.1") -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="logstream-broker-")
            data_dir = Path(self._tmp.name)
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port()
        self._port_chosen = not port  # ours to change if someone else takes it before the first start
        self._started_once = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.data_dir / "broker.log"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> EmbeddedBroker:
        """Start the broker and block until it answers a metadata request (at most `timeout` s).

        A restart keeps the port (clients keep their address). On the first start of a broker whose
        port was picked here, a broker that exits at once (the port was taken between the pick and
        its bind) is started again on a new port, up to three times. Raises BrokerError if the
        broker exits or is not ready in time."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 3 if self._port_chosen and not self._started_once else 1
        deadline = time.monotonic() + timeout
        for attempt in range(1, attempts + 1):
            try:
                self._launch(max(deadline - time.monotonic(), 1.0))
                break
            except _ExitedEarly as exc:
                if attempt == attempts:
                    raise BrokerError(str(exc)) from None
                log.warning("broker_port_taken", port=self.port, attempt=attempt)
                self.port = free_port()
        self._started_once = True
        log.info("broker_started", bootstrap_servers=self.bootstrap_servers, data_dir=str(self.data_dir))
        return self

    def _launch(self, timeout: float) -> None:
        command = [str(broker_binary()), "start", "--only", "kafka", "--kafka-port", str(self.port),
                   "--host", self.host, "--data-dir", str(self.data_dir)]
        with self._log_path.open("ab") as sink:
            self._process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # "connection refused" until the broker listens is the expected answer here, not news: log_level 0
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "socket.connection.setup.timeout.ms": 2000,
                             "log_level": 0})
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                raise _ExitedEarly(f"broker exited with {code}; see {self._log_path}")
            try:
                answered = bool(admin.list_topics(timeout=1.0).brokers)
            except Exception:  # noqa: BLE001 - not up yet
                answered = False
            if answered and self._answer_is_ours():
                return
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"broker not ready after {timeout:.0f}s; see {self._log_path}")

    def _answer_is_ours(self) -> bool:
        """Whether the broker that answered on the port is this one's process (another broker may hold the
        port while ours fails to bind it). Linux: our process holds the listening socket; elsewhere: our
        process is still alive a moment after the answer."""
        process = self._process
        if process is None:
            return False
        listening = _listening_inodes(self.port)
        if listening is None:
            time.sleep(0.2)
            return process.poll() is None
        return _holds_socket(process.pid, listening)

    def stop(self, timeout: float = 15.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.info("broker_stopped", bootstrap_servers=self.bootstrap_servers)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
