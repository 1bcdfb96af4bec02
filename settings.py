"""The app's settings: one object, read from the environment (app settings on Azure, local.settings.json
or the shell locally). Every setting the app reads is declared here and documented in
local.settings.json.example and the README.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent


class AppSettings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, case_sensitive=False, env_ignore_empty=True
    )

    # Backend ------------------------------------------------------------------------------------
    backend: Literal["local", "azure"] = Field("local", alias="PHI3_BACKEND")
    state_dir: Path = Field(PROJECT_ROOT / ".phi3", alias="PHI3_STATE_DIR")
    models_dir: Path = Field(PROJECT_ROOT / ".models", alias="PHI3_MODELS_DIR")
    # Local backend: a local copy of Phi-3-mini-4k-instruct (catalog name -> checkpoint directory).
    phi3_checkpoint_dir: Path | None = Field(None, alias="PHI3_LOCAL_CHECKPOINT_DIR")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", alias="PHI3_DEVICE")

    # Azure backend ------------------------------------------------------------------------------
    azure_subscription_id: str | None = Field(None, alias="AZURE_SUBSCRIPTION_ID")
    azure_resource_group: str | None = Field(None, alias="AZURE_RESOURCE_GROUP")
    azure_location: str | None = Field(None, alias="AZURE_LOCATION")
    azure_workspace: str | None = Field(None, alias="AZURE_ML_WORKSPACE")

    # Chat bot -----------------------------------------------------------------------------------
    bot_route: Literal["flow", "direct"] = Field("flow", alias="BOT_ROUTE")
    bot_endpoint_name: str | None = Field(None, alias="BOT_ENDPOINT_NAME")
    microsoft_app_id: str = Field("", alias="MicrosoftAppId")
    microsoft_app_password: SecretStr = Field(SecretStr(""), alias="MicrosoftAppPassword")
    microsoft_app_type: Literal["MultiTenant", "SingleTenant", "UserAssignedMSI"] = Field(
        "MultiTenant", alias="MicrosoftAppType"
    )
    microsoft_app_tenant_id: str = Field("", alias="MicrosoftAppTenantId")

    # Endpoint cleanup ---------------------------------------------------------------------------
    cleanup_schedule: str = Field("0 */30 * * * *", alias="CLEANUP_SCHEDULE")
    cleanup_dry_run: bool = Field(False, alias="CLEANUP_DRY_RUN")
    endpoint_idle_minutes: int = Field(120, alias="ENDPOINT_IDLE_MINUTES")

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> AppSettings:
    return AppSettings()  # type: ignore[call-arg]
