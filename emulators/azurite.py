"""Start and stop Azurite (Blob, Queue and Table storage) for tests and the demo.

Azurite runs from ``node_modules/.bin/azurite`` with ``--inMemoryPersistence --loose --skipApiVersionCheck
--silent --disableTelemetry`` on free loopback ports (it is started with port 0 and the ports it reports are read
from its output) in a temporary working directory. (Azurite refuses ``--location`` together with
``--inMemoryPersistence``, so the temporary directory is its working directory instead.) The connection string uses
Azurite's well-known development account ``devstoreaccount1`` and its publicly documented key.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = REPO_ROOT / "node_modules" / ".bin" / "azurite"
ACCOUNT_NAME = "devstoreaccount1"
# Azurite's documented, public development-storage key (not a secret; whitelisted by the secret scanner).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTEN_RE = re.compile(r"Azurite (Blob|Queue|Table) service is successfully listening at https?://[^:]+:(\d+)")


class AzuriteError(RuntimeError):
    """Azurite could not be started."""


@dataclass(frozen=True)
class AzuriteEndpoints:
    blob_port: int
    queue_port: int
    table_port: int
    host: str = "127.0.0.1"

    @property
    def connection_string(self) -> str:
        """The ``AzureWebJobsStorage``-style connection string for the three services."""
        base = f"http://{self.host}"
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
                f"BlobEndpoint={base}:{self.blob_port}/{ACCOUNT_NAME};"
                f"QueueEndpoint={base}:{self.queue_port}/{ACCOUNT_NAME};"
                f"TableEndpoint={base}:{self.table_port}/{ACCOUNT_NAME};")


class Azurite:
    """A running Azurite process. Use as a context manager or call :meth:`start`/:meth:`stop`."""

    def __init__(self, binary: str | os.PathLike[str] | None = None, startup_timeout: float = 30.0) -> None:
        self.binary = Path(binary) if binary else AZURITE_BIN
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[str] | None = None
        self.endpoints: AzuriteEndpoints | None = None
        self._workdir: str | None = None
        self._output: list[str] = []

    @staticmethod
    def available(binary: str | os.PathLike[str] | None = None) -> bool:
        """Whether the Azurite launcher and ``node`` exist."""
        path = Path(binary) if binary else AZURITE_BIN
        return path.exists() and shutil.which("node") is not None

    @property
    def connection_string(self) -> str:
        if self.endpoints is None:
            raise AzuriteError("Azurite is not running")
        return self.endpoints.connection_string

    def start(self) -> str:
        """Start Azurite, wait until all three ports accept connections, return the connection string."""
        if not self.available(self.binary):
            raise AzuriteError(f"Azurite not found at {self.binary} (run npm ci) or node is missing")
        self._workdir = tempfile.mkdtemp(prefix="azurite-")
        args = [str(self.binary), "--silent", "--inMemoryPersistence", "--extentMemoryLimit", "256", "--loose",
                "--skipApiVersionCheck", "--disableTelemetry",
                "--blobHost", "127.0.0.1", "--blobPort", "0", "--queueHost", "127.0.0.1", "--queuePort", "0",
                "--tableHost", "127.0.0.1", "--tablePort", "0"]
        self.process = subprocess.Popen(args, cwd=self._workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        ports: dict[str, int] = {}
        found = threading.Event()

        def reader() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                if len(self._output) < 200:
                    self._output.append(line.rstrip())
                m = _LISTEN_RE.search(line)
                if m:
                    ports[m.group(1).lower()] = int(m.group(2))
                    if len(ports) == 3:
                        found.set()
            found.set()

        threading.Thread(target=reader, name="azurite-output", daemon=True).start()
        if not found.wait(self.startup_timeout) or len(ports) != 3:
            output = "\n".join(self._output[-20:])
            self.stop()
            raise AzuriteError(f"Azurite did not report its ports within {self.startup_timeout}s:\n{output}")
        self.endpoints = AzuriteEndpoints(ports["blob"], ports["queue"], ports["table"])
        deadline = time.monotonic() + self.startup_timeout
        for port in (self.endpoints.blob_port, self.endpoints.queue_port, self.endpoints.table_port):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError as exc:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        self.stop()
                        raise AzuriteError(f"Azurite port {port} does not accept connections") from exc
                    time.sleep(0.05)
        return self.endpoints.connection_string

    def stop(self) -> None:
        """Terminate Azurite (its whole process group) and remove the working directory."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=5)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
