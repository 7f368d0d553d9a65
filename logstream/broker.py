"""The embedded Kafka-protocol broker (noida-db's Kafka service) for the demo and the tests.

Found in the installed `noida-db` package, started on a free port with its own data directory,
ready once a metadata request succeeds, stopped with SIGTERM (then SIGKILL) on exit. Production
deployments point logstream at Apache Kafka instead; nothing else changes.
"""

from __future__ import annotations

import importlib.util
import os
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.data_dir / "broker.log"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> EmbeddedBroker:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [str(broker_binary()), "start", "--only", "kafka", "--kafka-port", str(self.port),
                   "--host", self.host, "--data-dir", str(self.data_dir)]
        with self._log_path.open("ab") as sink:
            self._process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent)
        self._wait_ready(timeout)
        log.info("broker_started", bootstrap_servers=self.bootstrap_servers, data_dir=str(self.data_dir))
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # "connection refused" until the broker listens is the expected answer here, not news: log_level 0
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "socket.connection.setup.timeout.ms": 2000,
                             "log_level": 0})
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise BrokerError(f"broker exited with {self._process.returncode}; see {self._log_path}")
            try:
                if admin.list_topics(timeout=1.0).brokers:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"broker not ready after {timeout:.0f}s; see {self._log_path}")

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
