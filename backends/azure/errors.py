"""Azure failures as run failures a person can act on, and the bounded wait for short provisioning.

Permanent failures (permissions, bad names, quota, validation) become ``BackendError`` with what
to do. Transient ones (throttling and server errors that outlived azure-core's own retries,
connection failures, a resource still provisioning) propagate as they are, so the orchestrator's
retry policy runs the step again — every step is idempotent, so that is safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)

from backends.protocol import BackendError, NotFoundError, StillProvisioning

log = logging.getLogger(__name__)

PERMISSIONS_HELP = (
    "grant the app's identity Contributor on the resource group, and Role Based Access Control "
    "Administrator (or User Access Administrator) for the role assignments — see README 'Azure'"
)
ADVICE = {
    "AuthorizationFailed": f"the identity running the app is not allowed to do this; {PERMISSIONS_HELP}",
    "LinkedAuthorizationFailed": f"the identity running the app may not do this; {PERMISSIONS_HELP}",
    "SubscriptionNotFound": "the subscription does not exist or this identity cannot see it; check "
    "AZURE_SUBSCRIPTION_ID / azure.subscription_id",
    "InvalidSubscriptionId": "check AZURE_SUBSCRIPTION_ID / azure.subscription_id (a GUID)",
    "ResourceGroupNotFound": "the resource group does not exist; the workspace step creates it — run the "
    "whole pipeline, or check AZURE_RESOURCE_GROUP",
    "MissingSubscriptionRegistration": "register the resource provider named above on the subscription "
    "(az provider register --namespace <provider>)",
    "LocationNotAvailableForResourceType": "choose another azure.location / AZURE_LOCATION",
    "QuotaExceeded": "request more quota in Azure ML studio → Quota, or choose a smaller SKU/instance count",
}
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class ProvisioningPending(StillProvisioning, RuntimeError):
    """A resource is still provisioning after the step's wait budget; the orchestrator calls the step
    again after a durable timer (the cleanup timer, which has no orchestrator, tries on its next tick)."""


def error_code(exc: HttpResponseError) -> str:
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None) if error is not None else None
    return code or (exc.reason or "")


def describe(exc: Exception, limit: int = 400) -> str:
    message = getattr(exc, "message", None) or str(exc)
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[:limit] + "…"


@contextmanager
def azure_errors(action: str) -> Iterator[None]:
    """Run Azure calls for ``action`` (e.g. "create endpoint 'x'"), translating what a person must fix."""
    from azure.ai.ml.exceptions import MlException

    try:
        yield
    except ResourceNotFoundError as exc:
        if error_code(exc) == "SubscriptionNotFound":  # nothing to create: the whole target is wrong
            raise BackendError(f"{action}: {describe(exc, 200)}; {ADVICE['SubscriptionNotFound']}") from None
        raise  # the caller's get-or-create logic decides
    except (ResourceExistsError, ProvisioningPending, BackendError):
        raise  # the caller's get-or-create logic decides
    except ClientAuthenticationError as exc:
        raise BackendError(
            f"{action}: Azure refused the app's credential ({describe(exc, 200)}). On a Function App set "
            "AZURE_CLIENT_ID to its user-assigned identity; locally run `az login`."
        ) from None
    except HttpResponseError as exc:
        status = exc.status_code or 0
        if status in TRANSIENT_STATUS:
            raise  # outlived azure-core's retries: let the orchestrator retry the step
        code = error_code(exc)
        advice = ADVICE.get(code) or ("check the value named above" if status == 400 else "")
        text = f"{action}: Azure answered {status} {code}: {describe(exc)}"
        raise BackendError(f"{text}; {advice}" if advice else text) from None
    except MlException as exc:
        raise BackendError(f"{action}: {describe(exc)}") from None


def not_found(action: str, exc: ResourceNotFoundError) -> NotFoundError:
    return NotFoundError(f"{action}: {describe(exc, 200)}")


def wait_until(
    what: str,
    read_state: Callable[[], tuple[str, str | None]],
    *,
    budget_s: float,
    done: frozenset[str] = frozenset({"Succeeded"}),
    failed: frozenset[str] = frozenset({"Failed", "Canceled"}),
) -> str:
    """Poll ``read_state`` (state, error) until ``done``; a failed state is permanent, a long one transient.

    Only for operations that take minutes (registries, workspaces, endpoints, traffic): the hours-long
    ones (fine-tune jobs, deployments) are polled by the orchestrator on durable timers instead.
    """
    deadline = time.monotonic() + budget_s
    interval = 0.25
    while True:
        state, error = read_state()
        if state.lower() in {s.lower() for s in done}:
            return state
        if state.lower() in {s.lower() for s in failed}:
            raise BackendError(f"{what} ended {state}" + (f": {error}" if error else ""))
        if time.monotonic() >= deadline:
            raise ProvisioningPending(
                f"{what} is still {state} after {budget_s:.0f} s (AZURE_SETUP_WAIT_SECONDS); checked again "
                "after a durable timer"
            )
        log.info("waiting for %s (%s)", what, state)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 2, 15.0)
