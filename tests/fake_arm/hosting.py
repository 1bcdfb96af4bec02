"""The app as the tests run it against the fake: its settings, and the devhost serving it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from tests.support.devhost import PROJECT_ROOT, DevhostProcess

from .azure import FakeAzure

RESOURCE_GROUP = "rg-phi3-tests"
WORKSPACE = "phi3-tests"
CLOUD_MEMO = "AZUREML_CURRENT_CLOUD"  # azure-ai-ml remembers the cloud it resolved here, per process


def app_environment(fake: FakeAzure, state_dir: Path, location: str = "eastus") -> dict[str, str]:
    return {
        **fake.environment(),
        "PHI3_BACKEND": "azure",
        "PHI3_STATE_DIR": str(state_dir),
        "AZURE_RESOURCE_GROUP": RESOURCE_GROUP,
        "AZURE_LOCATION": location,
        "AZURE_ML_WORKSPACE": WORKSPACE,
        "AZURE_HTTP_TIMEOUT_SECONDS": "3",
        # Less than azure-core's 4 tries of 3 s, so a stalled read shows the HTTP answer's own bound.
        "HTTP_BACKEND_WAIT_SECONDS": "8",
        "AZURE_SETUP_WAIT_SECONDS": "30",
        "HF_HUB_OFFLINE": "1",
        # The cleanup timer's default (every :00 and :30) would fire in the middle of a run now and
        # then, adding its list calls to the transcript; the cleanup tests set their own schedule.
        "CLEANUP_SCHEDULE": "0 0 0 1 1 *",
    }


class AzureHost(DevhostProcess):
    """The devhost running the real function_app.py with PHI3_BACKEND=azure against ``fake``."""

    def __init__(self, fake: FakeAzure, folder: Path, location: str = "eastus"):
        super().__init__(
            PROJECT_ROOT, folder / "devhost", env=app_environment(fake, folder / "phi3", location)
        )
        self.env.pop(CLOUD_MEMO, None)
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
        raise TimeoutError(
            f"run {run_id} never got there: {json.dumps(last)[:3000]}\n{self.log_text()[-4000:]}"
        )

    def run_to_end(self, body: dict, timeout: float = 240) -> dict:
        return self.wait_summary(self.start_run(body), finished, timeout)


def finished(summary: dict) -> bool:
    return summary["status"] in ("Completed", "Failed", "Terminated")


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


def resources(fake: FakeAzure, kind: str) -> list[str]:
    return sorted(r["id"] for r in fake.store.by_type(kind))


# What one managed_compute run leaves on the fake, however often it ran, retried or was interrupted.
ONE_OF_EACH = {
    "resource groups": 1,
    "workspaces": 3,  # the Azure ML workspace; the Azure AI Foundry hub + project the flow is published to
    "storage accounts": 2,  # the workspace's and the hub's
    "flows": 1,
    "jobs": 1,
    "models": 1,
    "data versions": 2,
    "registries": 1,
    "identities": 1,
    "role assignments": 3,
    "clusters": 1,
    "online endpoints": 1,
    "deployments": 1,
}


def one_of_each(fake: FakeAzure, *, serverless: bool = False) -> dict[str, int]:
    aml = "Microsoft.MachineLearningServices/workspaces"
    kinds = {
        "resource groups": "Microsoft.Resources/resourceGroups",
        "workspaces": aml,
        "storage accounts": "Microsoft.Storage/storageAccounts",
        "jobs": f"{aml}/jobs",
        "models": f"{aml}/models/versions",
        "data versions": f"{aml}/data/versions",
    }
    if serverless:
        kinds["serverless endpoints"] = f"{aml}/serverlessEndpoints"
    else:
        kinds |= {
            "registries": "Microsoft.ContainerRegistry/registries",
            "identities": "Microsoft.ManagedIdentity/userAssignedIdentities",
            "role assignments": "Microsoft.Authorization/roleAssignments",
            "clusters": f"{aml}/computes",
            "online endpoints": f"{aml}/onlineEndpoints",
            "deployments": f"{aml}/onlineEndpoints/deployments",
        }
    counts = {label: len(resources(fake, kind)) for label, kind in kinds.items()}
    counts["flows"] = sum(len(flows) for flows in fake.flows.values())
    return counts
