"""Azurite, Microsoft's Azure Storage emulator, as the blob service behind the fake workspaces.

The app uploads training data with the real azure-storage-blob client, so the bytes go through a
real implementation of the Blob REST API. Azurite is an npm package pinned in
``tests/fake_arm/azurite/package.json`` (3.35.0, the newest that runs on Node 20) and installed
from its lockfile with ``npm ci`` into that folder's ``node_modules`` the first time it is needed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "azurite"
BINARY = HERE / "node_modules" / ".bin" / "azurite-blob"
# Azurite's documented development account (public; the same in every Azurite installation).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteUnavailable(RuntimeError):
    pass


def ensure_installed() -> Path:
    if BINARY.exists():
        return BINARY
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteUnavailable("npm is not on PATH; install Node.js 20+ to run the Azure backend tests")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or not BINARY.exists():
        raise AzuriteUnavailable(
            f"npm ci in {HERE} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return BINARY


class AzuriteBlob:
    """One Azurite blob service on a free loopback port, storing under ``folder``."""

    account = ACCOUNT
    key = KEY

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.output: list[str] = []

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.account_url};"
        )

    def start(self, timeout: float = 60) -> AzuriteBlob:
        binary = ensure_installed()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--location",
                str(self.folder),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                "0",
                "--skipApiVersionCheck",
                "--loose",
                "--disableTelemetry",
                "--silent",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                self.output.append(line)
                found = re.search(r"listens on http://127\.0\.0\.1:(\d+)", line)
                if found:
                    self.port = int(found.group(1))
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AzuriteUnavailable("Azurite did not start:\n" + "".join(self.output[-30:]))
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def _service(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def create_container(self, name: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        try:
            self._service().create_container(name)
        except ResourceExistsError:
            pass

    def blobs(self, container: str) -> dict[str, bytes]:
        client = self._service().get_container_client(container)
        return {b.name: client.download_blob(b.name).readall() for b in client.list_blobs()}
