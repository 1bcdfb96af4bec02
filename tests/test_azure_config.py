"""Bad Azure configurations fail before anything is created, with messages that name the fix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from backends.azure.backend import AzureBackend
from backends.protocol import BackendError
from pipeline.config import InvalidRunConfig, RunConfig, parse_run_config
from settings import AppSettings
from tests.fake_arm import seed
from tests.fake_arm.azure import FakeAzure
from tests.fake_arm.hosting import RESOURCE_GROUP, WORKSPACE

pytest_plugins = ["tests.fake_arm.fixtures"]


def writes(fake: FakeAzure) -> list[str]:
    return [f"{e.method} {e.route}" for e in fake.server.exchanges if e.method in ("PUT", "PATCH", "DELETE")]


def config(settings: AppSettings, **body) -> RunConfig:
    return parse_run_config(
        {"dataset": {"hub_id": None, "files": ["sample_data/support_chats.jsonl"]}, **body}, settings
    )


def test_a_missing_subscription_is_refused_by_the_run_config_and_by_the_backend(
    azure_settings, fake_azure, monkeypatch
):
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID")
    settings = AppSettings()
    with pytest.raises(InvalidRunConfig) as refused:
        config(settings)
    assert [(p.field, p.message) for p in refused.value.problems] == [
        (
            "azure.subscription_id",
            "set the app setting AZURE_SUBSCRIPTION_ID (required with PHI3_BACKEND=azure)",
        )
    ]
    # The run config cannot stand in for it: the status polls, the bot and the cleanup timer read the
    # app settings alone.
    with pytest.raises(InvalidRunConfig, match="set the app setting AZURE_SUBSCRIPTION_ID"):
        config(settings, azure={"subscription_id": "00000000-0000-4000-8000-000000000001"})
    with pytest.raises(BackendError, match="set the app setting AZURE_SUBSCRIPTION_ID"):
        AzureBackend(settings).ensure_workspace(RunConfig())
    assert fake_azure.server.exchanges == []


@pytest.mark.parametrize("workspace_setting", ["phi3-finetune", None], ids=["set", "unset: its default"])
def test_a_run_config_workspace_other_than_the_app_settings_is_refused_before_any_call(
    azure_settings, fake_azure, monkeypatch, workspace_setting
):
    # With the setting unset the app's other parts use its default workspace: a run elsewhere would
    # leave a GPU endpoint the cleanup timer never sees, and its job's status polls would look in vain.
    if workspace_setting:
        monkeypatch.setenv("AZURE_ML_WORKSPACE", workspace_setting)
    else:
        monkeypatch.delenv("AZURE_ML_WORKSPACE", raising=False)
    settings = AppSettings()
    named = "the app setting AZURE_ML_WORKSPACE" if workspace_setting else "AZURE_ML_WORKSPACE's default"
    expected = (
        f"'somewhere-else' differs from {named} 'phi3-finetune'; the status polls, the bot and the "
        "cleanup timer use the app setting, so change AZURE_ML_WORKSPACE instead"
    )
    with pytest.raises(InvalidRunConfig) as refused:
        config(settings, azure={"workspace": "somewhere-else"})
    assert [(p.field, p.message) for p in refused.value.problems] == [("azure.workspace", expected)]
    with pytest.raises(BackendError) as backend_refused:
        AzureBackend(settings).ensure_workspace(
            RunConfig.model_validate({"azure": {"workspace": "somewhere-else"}})
        )
    assert str(backend_refused.value) == f"azure.workspace: {expected}"
    assert fake_azure.server.exchanges == []
    config(settings, azure={"workspace": "phi3-finetune"})  # restating it is fine


def test_an_unknown_subscription_fails_at_the_first_azure_call_naming_the_setting(
    azure_settings, fake_azure, monkeypatch
):
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "00000000-0000-4000-8000-0000000000ff")
    settings = AppSettings()
    with pytest.raises(BackendError, match=r"SubscriptionNotFound.*check AZURE_SUBSCRIPTION_ID"):
        AzureBackend(settings).ensure_workspace(config(settings))
    assert writes(fake_azure) == []


def test_serverless_outside_east_us_2_is_refused_before_any_call(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    with pytest.raises(InvalidRunConfig, match="only in East US 2"):
        config(azure_backend.settings, mode="serverless")
    cfg = RunConfig(mode="serverless")  # as if the config check had been bypassed
    with pytest.raises(
        BackendError, match=r"only in East US 2 \(eastus2\), not 'eastus'; set azure.location"
    ):
        azure_backend.ensure_workspace(cfg)
    assert fake_azure.server.exchanges == []


def test_a_retired_or_unknown_sku_is_refused_with_the_skus_offered(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    cfg = config(azure_backend.settings, deployment={"instance_type": "Standard_NC6s_v3"})
    with pytest.raises(BackendError) as refused:
        azure_backend.ensure_workspace(cfg)
    message = str(refused.value)
    assert "deployment.instance_type 'Standard_NC6s_v3' is not an Azure ML VM size in eastus" in message
    assert "retired on 2025-09-30" in message and "Standard_NC24ads_A100_v4" in message
    assert writes(fake_azure) == []


@pytest.fixture
def short_quota(fake_azure: FakeAzure) -> FakeAzure:
    fake_azure.config.quota[("standardNCADSA100v4Family", "eastus")] = (24, 48)
    return fake_azure


def test_short_quota_is_refused_with_the_numbers_and_the_fix(
    azure_backend: AzureBackend, short_quota: FakeAzure
):
    with pytest.raises(BackendError) as refused:
        azure_backend.ensure_workspace(config(azure_backend.settings))
    message = str(refused.value)
    # One NC24ads_A100_v4 instance reserves a second one for upgrades: 48 vCPUs, 24 free.
    assert "Standard NCADSA100v4 Family Cluster Dedicated vCPUs: 24/48 used, 24 free, run needs 48" in message
    assert "Request an increase in Azure ML studio → Quota" in message
    assert writes(short_quota) == []


def test_a_hyperparameter_the_component_does_not_declare_is_refused(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    cfg = config(azure_backend.settings, hyperparameters={"warmup_ratio": 0.25})
    with pytest.raises(
        BackendError, match=r"hyperparameters.warmup_ratio: not an input of .*chat_completion_pipeline"
    ):
        azure_backend.ensure_workspace(cfg)
    assert writes(fake_azure) == []


def test_a_new_workspace_named_with_a_digit_first_is_refused_before_its_template(
    azure_settings, fake_azure: FakeAzure, monkeypatch
):
    # azure-ai-ml would name the workspace's Key Vault "9liveswskeyvault…", which Key Vault refuses.
    monkeypatch.setenv("AZURE_ML_WORKSPACE", "9-lives-ws")
    with pytest.raises(BackendError, match="needs a name that starts with a letter, not '9-lives-ws'"):
        AzureBackend(AppSettings()).ensure_workspace(config(AppSettings()))
    assert "PUT workspace" not in writes(fake_azure)
    assert not [
        e for e in fake_azure.server.exchanges if e.route == "template-deployment" and e.method == "PUT"
    ]


def test_a_sku_outside_the_models_recommended_list_only_warns(azure_backend: AzureBackend):
    details = azure_backend.preflight(
        config(azure_backend.settings, deployment={"instance_type": "Standard_NC12s_v3"})
    )
    assert "not in Phi-3-mini-4k-instruct's inference-recommended-sku list" in details["warning"]
    assert details["base_model"] == "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/14"


def test_an_endpoint_name_taken_in_the_region_names_the_setting_to_change(
    azure_backend: AzureBackend, fake_azure: FakeAzure
):
    seed.workspace(fake_azure, RESOURCE_GROUP, WORKSPACE)
    cfg = config(azure_backend.settings)
    azure_backend.ensure_identity(cfg)
    fake_azure.config.taken_endpoint_names["eastus"] = {"phi3ft-taken1"}
    tags = {
        "managed-by": "phi3-finetune-functions",
        "run-id": "r",
        "expires-at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }
    with pytest.raises(BackendError, match=r"the name is taken in this region.*set deployment.endpoint_name"):
        azure_backend.ensure_endpoint("phi3ft-taken1", tags, cfg)
