"""The app's settings: one object, read from the environment (app settings on Azure, local.settings.json
or the shell locally). Every setting the app reads is declared here and documented in
local.settings.json.example and the README.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent


def writable_home(name: str) -> Path:
    """``<project>/.<name>``, or ``<temp>/phi3/<name>`` where the project folder is read-only: a Function
    App runs from its deployment package (Flex Consumption always does), so its ``wwwroot`` takes no writes
    (``os.access`` says so for a read-only mount); the temp folder is the instance's own."""
    if os.access(PROJECT_ROOT, os.W_OK):
        return PROJECT_ROOT / f".{name}"
    return Path(tempfile.gettempdir()) / "phi3" / name


class AppSettings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, case_sensitive=False, env_ignore_empty=True
    )

    # Backend ------------------------------------------------------------------------------------
    backend: Literal["local", "azure"] = Field("local", alias="PHI3_BACKEND")
    state_dir: Path = Field(default_factory=lambda: writable_home("phi3"), alias="PHI3_STATE_DIR")
    models_dir: Path = Field(default_factory=lambda: writable_home("models"), alias="PHI3_MODELS_DIR")
    # Local backend: a local copy of Phi-3-mini-4k-instruct (catalog name -> checkpoint directory).
    phi3_checkpoint_dir: Path | None = Field(None, alias="PHI3_LOCAL_CHECKPOINT_DIR")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", alias="PHI3_DEVICE")

    # Azure backend ------------------------------------------------------------------------------
    azure_subscription_id: str | None = Field(None, alias="AZURE_SUBSCRIPTION_ID")
    azure_resource_group: str | None = Field(None, alias="AZURE_RESOURCE_GROUP")
    azure_location: str | None = Field(None, alias="AZURE_LOCATION")
    azure_workspace: str | None = Field(None, alias="AZURE_ML_WORKSPACE")
    # Sovereign or private clouds: ARM's cloud metadata document (azure-ai-ml reads the same variable).
    # Unset = Azure public cloud.
    azure_cloud_metadata_url: str | None = Field(None, alias="ARM_CLOUD_METADATA_URL")
    # How long one Azure call may take before it is retried (connect and read timeout, seconds).
    # (Bounds: a step makes several calls and waits within host.json's 10-minute functionTimeout, an
    # HTTP answer within Azure's 230 s.)
    azure_http_timeout_seconds: float = Field(60.0, gt=0, le=120, alias="AZURE_HTTP_TIMEOUT_SECONDS")
    # How long an HTTP answer waits on one backend call (a finished run's endpoint, ?metrics=true's loss
    # history, a cancel's job) before it answers without it: a stalled Azure call is tried for up to 4 ×
    # AZURE_HTTP_TIMEOUT_SECONDS, and Azure's front end drops an answer after 230 s.
    http_backend_wait_seconds: float = Field(60.0, gt=0, le=100, alias="HTTP_BACKEND_WAIT_SECONDS")
    # How long a setup step (workspace, registry, endpoint, traffic) waits for Azure to finish
    # provisioning before it hands back to the orchestrator to retry; keep it under the functionTimeout.
    azure_setup_wait_seconds: float = Field(20.0, gt=0, le=120, alias="AZURE_SETUP_WAIT_SECONDS")
    # How long the evaluate step keeps asking the models before it hands back (the next call goes on
    # where it stopped): one activity must end within host.json's functionTimeout (10 min), a question
    # started just before this budget may take deployment.request_timeout_ms (up to 3 min), and loading
    # the flow and logging the results take the rest.
    evaluation_call_budget_s: float = Field(360.0, gt=0, le=400, alias="EVALUATION_CALL_BUDGET_S")
    # How long one call of the prepare_dataset step reads and checks rows before it hands back (its
    # progress is saved; the next call goes on from there): one activity must end within host.json's
    # functionTimeout (10 min), and past this budget a call still finishes its chunk of rows (at most
    # 5 s) and, the last one, writes the split files.
    dataset_call_budget_s: float = Field(360.0, gt=0, le=420, alias="DATASET_CALL_BUDGET_S")
    # Evaluation on Azure compares with the base model only when this is on: it deploys the catalog
    # model beside the fine-tuned one (a second GPU deployment, billed while it exists).
    azure_evaluate_base_model: bool = Field(False, alias="AZURE_EVALUATE_BASE_MODEL")

    # Chat bot -----------------------------------------------------------------------------------
    bot_route: Literal["flow", "direct"] = Field("flow", alias="BOT_ROUTE")
    bot_endpoint_name: str | None = Field(None, alias="BOT_ENDPOINT_NAME")
    microsoft_app_id: str = Field("", alias="MicrosoftAppId")
    microsoft_app_password: SecretStr = Field(SecretStr(""), alias="MicrosoftAppPassword")
    microsoft_app_type: Literal["MultiTenant", "SingleTenant", "UserAssignedMSI"] = Field(
        "MultiTenant", alias="MicrosoftAppType"
    )
    microsoft_app_tenant_id: str = Field("", alias="MicrosoftAppTenantId")
    # Answers not ready within this many seconds are acknowledged and delivered proactively
    # (channels give up on a turn after ~15 s and Teams retries the POST).
    bot_ack_after_s: float = Field(5.0, ge=0, le=200, alias="BOT_ACK_AFTER_S")
    bot_model_timeout_s: float = Field(120.0, gt=0, le=180, alias="BOT_MODEL_TIMEOUT_S")
    # How long a finished slow-answer delivery keeps its Durable history before the hourly purge.
    bot_delivery_history_hours: float = Field(24.0, ge=0, alias="BOT_DELIVERY_HISTORY_HOURS")
    # History kept per conversation: at most this many turns and characters (Phi-3-mini-4k's context
    # is 4096 tokens, ~3 characters each; the question and the answer need room too).
    bot_history_turns: int = Field(10, ge=0, alias="BOT_HISTORY_TURNS")
    bot_history_chars: int = Field(6000, ge=0, alias="BOT_HISTORY_CHARS")
    bot_max_question_chars: int = Field(2000, ge=1, alias="BOT_MAX_QUESTION_CHARS")
    bot_temperature: float = Field(0.7, ge=0, alias="BOT_TEMPERATURE")
    bot_max_new_tokens: int = Field(128, ge=1, alias="BOT_MAX_NEW_TOKENS")
    # Conversation state: memory (one process; local) or blob (Azure Storage, shared by instances).
    bot_state_store: Literal["memory", "blob"] | None = Field(None, alias="BOT_STATE_STORE")
    bot_state_container: str = Field("bot-state", alias="BOT_STATE_CONTAINER")
    bot_state_connection_string: SecretStr | None = Field(None, alias="BOT_STATE_CONNECTION_STRING")
    bot_state_account_url: str | None = Field(None, alias="BOT_STATE_ACCOUNT_URL")
    azure_webjobs_storage: SecretStr | None = Field(None, alias="AzureWebJobsStorage")
    # Identity-based host storage (no connection string): the account the Function App already uses.
    azure_webjobs_storage_account: str | None = Field(None, alias="AzureWebJobsStorage__accountName")

    @property
    def bot_state_store_kind(self) -> Literal["memory", "blob"]:
        """``BOT_STATE_STORE`` if set; else blob on Azure (several instances), memory locally."""
        if self.bot_state_store:
            return self.bot_state_store
        return "blob" if self.backend == "azure" else "memory"

    # Endpoint cleanup ---------------------------------------------------------------------------
    cleanup_schedule: str = Field("0 */30 * * * *", alias="CLEANUP_SCHEDULE")
    cleanup_dry_run: bool = Field(False, alias="CLEANUP_DRY_RUN")
    # At least a minute: 0 or less would count an endpoint a run has just deployed as idle.
    endpoint_idle_minutes: int = Field(120, ge=1, alias="ENDPOINT_IDLE_MINUTES")
    cleanup_delete_models: bool = Field(False, alias="CLEANUP_DELETE_MODELS")

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> AppSettings:
    return AppSettings()  # type: ignore[call-arg]


def writable_hf_home(settings: AppSettings, environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Point ``HF_HOME`` into the state folder where the Hugging Face default is not writable; the folder
    chosen, or None where nothing changed.

    ``datasets`` writes under ``HF_HOME`` (default ``~/.cache/huggingface``) even when it streams a hub
    dataset (its modules and metadata caches), and a deployed app's home folder may take no writes. It reads
    the variable once, on import, so this runs when the app loads, before anything imports it. A user's own
    ``HF_HOME`` is kept."""
    if environ.get("HF_HOME"):
        return None
    try:
        cache = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    except RuntimeError:  # no home folder at all
        cache = None
    if cache is not None:
        existing = next(folder for folder in (cache, *cache.parents) if folder.exists())
        if os.access(existing, os.W_OK):
            return None
    environ["HF_HOME"] = str(settings.state_dir / "huggingface")
    return settings.state_dir / "huggingface"
