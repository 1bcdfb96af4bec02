"""Which online endpoint answers, and its key: asked of the backend at run time, kept in memory only.

The endpoint is ``BOT_ENDPOINT_NAME`` when set, else the newest healthy endpoint this app deployed
(tag ``managed-by``, provisioning Succeeded, traffic on some deployment). The choice is refreshed
every ``refresh_s`` so a new deployment takes over without a restart; the key is fetched once per
endpoint and again only when the endpoint refuses it (keys change when they are regenerated).
Keys never leave this module except inside ``ModelEndpoint``, whose repr hides them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from activities.steps import MANAGED_BY  # the pipeline's endpoint step tags what it creates with it
from backends.protocol import BackendError, EndpointState, MLBackend, NotFoundError
from backends.scoring import Contract, contract_for

log = logging.getLogger("bot.endpoints")


class NoEndpointError(Exception):
    """No endpoint can answer: none deployed yet, or the configured one is missing or unhealthy."""


@dataclass(frozen=True)
class EndpointChoice:
    name: str
    scoring_uri: str
    deployment: str | None  # the deployment taking the traffic
    chosen_by: str  # "BOT_ENDPOINT_NAME" or "newest healthy"
    kind: str = "online"  # "serverless" endpoints speak the chat-completions contract


@dataclass(frozen=True)
class ModelEndpoint:
    choice: EndpointChoice
    key: str = field(repr=False)

    @property
    def name(self) -> str:
        return self.choice.name

    @property
    def scoring_uri(self) -> str:
        return self.choice.scoring_uri

    @property
    def contract(self) -> Contract:
        return contract_for(self.choice.kind)


def is_healthy(endpoint: EndpointState) -> bool:
    return (
        endpoint.provisioning_state == "Succeeded"
        and bool(endpoint.scoring_uri)
        and sum(endpoint.traffic.values()) > 0
    )


def _serving_deployment(endpoint: EndpointState) -> str | None:
    live = [(share, name) for name, share in endpoint.traffic.items() if share > 0]
    return max(live)[1] if live else None


def newest_healthy(endpoints: list[EndpointState]) -> EndpointState | None:
    """The newest healthy online endpoint this app made (by creation time, else by ``expires-at``).

    A serverless endpoint (chat-completions contract) answers only when BOT_ENDPOINT_NAME names it.
    """
    ours = [
        e
        for e in endpoints
        if e.tags.get("managed-by") == MANAGED_BY and e.kind == "online" and is_healthy(e)
    ]
    return max(ours, key=lambda e: (e.created_at or "", e.tags.get("expires-at", ""), e.name), default=None)


class EndpointDirectory:
    """Resolves the answering endpoint and its key through the backend (sync calls, run in a thread)."""

    def __init__(
        self,
        backend: Callable[[], MLBackend],
        *,
        endpoint_name: str | None = None,
        refresh_s: float = 60.0,
    ) -> None:
        self._backend = backend
        self._endpoint_name = endpoint_name
        self._refresh_s = refresh_s
        self._choice: EndpointChoice | None = None
        self._chosen_at = 0.0
        self._keys: dict[str, str] = {}

    async def choose(self) -> EndpointChoice:
        """The endpoint that answers now (cached for ``refresh_s``)."""
        if self._choice is None or time.monotonic() - self._chosen_at > self._refresh_s:
            self._choice = await asyncio.to_thread(self._choose_now)
            self._chosen_at = time.monotonic()
        return self._choice

    async def current(self) -> ModelEndpoint:
        """The answering endpoint with its key."""
        choice = await self.choose()
        key = self._keys.get(choice.name)
        if key is None:
            key = await asyncio.to_thread(self._fetch_key, choice.name)
            self._keys[choice.name] = key
        return ModelEndpoint(choice, key)

    def forget_key(self, endpoint_name: str) -> None:
        """The endpoint refused the key: fetch it again next time."""
        self._keys.pop(endpoint_name, None)

    def forget_choice(self) -> None:
        """The endpoint is gone or unreachable: choose again next time."""
        self._choice = None

    def _choose_now(self) -> EndpointChoice:
        backend = self._backend()
        if self._endpoint_name:
            try:
                endpoint = backend.get_endpoint(self._endpoint_name)
            except NotFoundError:
                raise NoEndpointError(
                    f"the endpoint '{self._endpoint_name}' named by BOT_ENDPOINT_NAME does not exist; "
                    "deploy it or clear the setting to use the newest deployed endpoint"
                ) from None
            if not is_healthy(endpoint):
                raise NoEndpointError(
                    f"the endpoint '{endpoint.name}' named by BOT_ENDPOINT_NAME is not ready "
                    f"(provisioning {endpoint.provisioning_state}, traffic {endpoint.traffic})"
                )
            chosen_by = "BOT_ENDPOINT_NAME"
        else:
            found = newest_healthy(backend.list_endpoints())
            if found is None:
                raise NoEndpointError(
                    "no model is deployed yet: start a fine-tune run (POST /api/finetune) and ask again "
                    "when it has finished"
                )
            endpoint, chosen_by = found, "newest healthy"
        assert endpoint.scoring_uri  # is_healthy checked it
        log.info("bot endpoint chosen endpoint=%s chosen_by=%s", endpoint.name, chosen_by)
        return EndpointChoice(
            endpoint.name, endpoint.scoring_uri, _serving_deployment(endpoint), chosen_by, endpoint.kind
        )

    def _fetch_key(self, name: str) -> str:
        try:
            return self._backend().get_endpoint_keys(name).primary.get_secret_value()
        except NotFoundError:
            self.forget_choice()
            raise NoEndpointError(f"the endpoint '{name}' was deleted; ask again to use another") from None

    async def describe(self) -> dict[str, str | None]:
        """What ``/status`` shows: endpoint, deployment and model (never the key)."""
        choice = await self.choose()
        model = await asyncio.to_thread(self._model_of, choice)
        return {
            "endpoint": choice.name,
            "deployment": choice.deployment,
            "model": model,
            "chosen_by": choice.chosen_by,
        }

    def _model_of(self, choice: EndpointChoice) -> str | None:
        if not choice.deployment:
            return None
        try:
            return self._backend().get_deployment(choice.name, choice.deployment).model
        except BackendError as exc:
            log.warning("bot status: cannot read deployment %s/%s: %s", choice.name, choice.deployment, exc)
            return None
