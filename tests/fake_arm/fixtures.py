"""pytest fixtures: Azurite, the fake Azure, the app's settings pointed at it, and a devhost running the app.

The app is configured exactly as on Azure, only with the cloud metadata URL and the Entra ID
app registration of the fake (``FakeAzure.environment()``); nothing in the app knows it is a test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.devhost import PROJECT_ROOT, DevhostProcess

from .azure import FakeAzure, FakeAzureConfig
from .azurite import AzuriteBlob

RESOURCE_GROUP = "rg-phi3-tests"
WORKSPACE = "phi3-tests"


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[AzuriteBlob]:
    blob = AzuriteBlob(tmp_path_factory.mktemp("azurite")).start()
    yield blob
    blob.stop()


@pytest.fixture
def fake_config() -> FakeAzureConfig:
    """Override in a test module to change what the fake allows (quota, regions, statuses...)."""
    return FakeAzureConfig()


@pytest.fixture
def fake_azure(tmp_path: Path, azurite: AzuriteBlob, fake_config: FakeAzureConfig) -> Iterator[FakeAzure]:
    fake = FakeAzure(tmp_path / "fake-azure", fake_config, blob=azurite).start()
    yield fake
    fake.stop()


def app_environment(fake: FakeAzure, state_dir: Path, location: str = "eastus") -> dict[str, str]:
    return {
        **fake.environment(),
        "PHI3_BACKEND": "azure",
        "PHI3_STATE_DIR": str(state_dir),
        "AZURE_RESOURCE_GROUP": RESOURCE_GROUP,
        "AZURE_LOCATION": location,
        "AZURE_ML_WORKSPACE": WORKSPACE,
        "AZURE_HTTP_TIMEOUT_SECONDS": "3",
        "AZURE_SETUP_WAIT_SECONDS": "30",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture
def azure_settings(fake_azure: FakeAzure, tmp_path: Path, monkeypatch):
    """This process's settings pointed at the fake (for tests that drive the backend in-process)."""
    from settings import AppSettings

    for name, value in app_environment(fake_azure, tmp_path / "phi3").items():
        monkeypatch.setenv(name, value)
    # azure-ai-ml remembers the cloud it resolved in this variable; make it resolve this fake's.
    monkeypatch.delenv("AZUREML_CURRENT_CLOUD", raising=False)
    return AppSettings()


@pytest.fixture
def azure_backend(azure_settings):
    from backends.azure.backend import AzureBackend

    return AzureBackend(azure_settings)


class AzureHost(DevhostProcess):
    """The devhost running the real function_app.py with PHI3_BACKEND=azure against ``fake``."""

    def __init__(self, fake: FakeAzure, folder: Path, location: str = "eastus"):
        super().__init__(PROJECT_ROOT, folder / "devhost", env=app_environment(fake, folder / "phi3", location))
        self.fake = fake

    def start_run(self, body: dict) -> str:
        r = requests.post(f"{self.url}/api/finetune", json=body, timeout=60)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def summary(self, run_id: str) -> dict:
        r = requests.get(f"{self.url}/api/runs/{run_id}", timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_summary(self, run_id: str, until, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            last = self.summary(run_id)
            if until(last):
                return last
            time.sleep(0.1)
        raise TimeoutError(f"run {run_id} never got there: {json.dumps(last)[:3000]}\n{self.log_text()[-4000:]}")

    def run_to_end(self, body: dict, timeout: float = 240) -> dict:
        return self.wait_summary(self.start_run(body), finished, timeout)


def finished(summary: dict) -> bool:
    return summary["status"] in ("Completed", "Failed", "Terminated")


@pytest.fixture
def azure_host(fake_azure: FakeAzure, tmp_path: Path) -> Iterator[AzureHost]:
    host = AzureHost(fake_azure, tmp_path)
    host.start()
    yield host
    host.stop()


def run_body(run_id: str, **overrides) -> dict:
    """A run config for the fake: the tutorial's defaults on the shipped sample chats, polled quickly."""
    body = {
        "run_id": run_id,
        "dataset": {"hub_id": None, "files": ["sample_data/support_chats.jsonl"], "max_tokens": 512},
        "evaluation": {"sample_size": 3},
        "polling": {"initial_seconds": 0.5, "max_seconds": 0.5, "timeout_hours": 1},
    }
    body.update(overrides)
    return body
