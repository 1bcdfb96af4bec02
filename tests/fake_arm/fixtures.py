"""pytest fixtures: Azurite, the fake Azure, the app's settings pointed at it, and a devhost running the app.

The app is configured exactly as on Azure, only with the cloud metadata URL and the Entra ID
app registration of the fake (``FakeAzure.environment()``); nothing in the app knows it is a test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .azure import FakeAzure, FakeAzureConfig
from .azurite import AzuriteBlob
from .hosting import CLOUD_MEMO, AzureHost, app_environment


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


@pytest.fixture
def azure_settings(fake_azure: FakeAzure, tmp_path: Path, monkeypatch):
    """This process's settings pointed at the fake (for tests that drive the backend in-process)."""
    from settings import AppSettings

    for name, value in app_environment(fake_azure, tmp_path / "phi3").items():
        monkeypatch.setenv(name, value)
    # azure-ai-ml remembers the cloud it resolved in this variable (set behind monkeypatch's back):
    # start without it so it resolves this fake's cloud, and leave without it for the next test.
    os.environ.pop(CLOUD_MEMO, None)
    yield AppSettings()
    os.environ.pop(CLOUD_MEMO, None)


@pytest.fixture
def azure_backend(azure_settings):
    from backends.azure.backend import AzureBackend

    return AzureBackend(azure_settings)


@pytest.fixture
def azure_host(fake_azure: FakeAzure, tmp_path: Path) -> Iterator[AzureHost]:
    host = AzureHost(fake_azure, tmp_path)
    host.start()
    yield host
    host.stop()
