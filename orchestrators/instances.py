"""Every orchestration instance of the task hub, page after page.

The Durable Python SDK's ``get_status_all`` and ``get_status_by`` read one page of the host's instance
query and drop the rest: the extension answers at most ``top`` instances (100 when not given), with an
``x-ms-continuation-token`` header for the next page, which the SDK never reads. Past 100 instances
(a run adds one per wait step, a slow bot answer one) runs would vanish from ``GET /api/runs`` and
``/status`` would name whichever run happened to be on the first page (the Azure Storage provider does
not list by creation time). ``list_instances`` follows the token over the same RPC endpoint.
"""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
import azure.durable_functions as df
from azure.durable_functions.models.DurableOrchestrationStatus import DurableOrchestrationStatus

PIPELINE = "finetune_pipeline"  # the run orchestration (orchestrators.finetune)
PAGE_SIZE = 100  # the extension's own default page
MAX_PAGES = 1000  # 100,000 instances: purge history long before this
TOKEN = "x-ms-continuation-token"
TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)


class InstanceQueryError(RuntimeError):
    """The host did not answer the instance query (its status, never a body with inputs)."""


async def list_instances(
    client: df.DurableOrchestrationClient,
    *,
    page_size: int = PAGE_SIZE,
    instance_id_prefix: str | None = None,
    runtime_status: list[df.OrchestrationRuntimeStatus] | None = None,
    created_time_to: datetime | None = None,
) -> list[DurableOrchestrationStatus]:
    """Every instance (or those the filters the extension's query takes select), without inputs: the
    runs API and ``/status`` need names, status and custom status."""
    # The client keeps its binding's RPC base URL here only; it is what its own queries call.
    base = client._orchestration_bindings.rpc_base_url
    if not base:
        raise InstanceQueryError("the Durable client binding has no RPC base URL")
    params = {"top": str(page_size), "showInput": "false"}
    if instance_id_prefix:
        params["instanceIdPrefix"] = instance_id_prefix
    if runtime_status:
        params["runtimeStatus"] = ",".join(status.value for status in runtime_status)
    if created_time_to is not None:
        params["createdTimeTo"] = created_time_to.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    found: list[DurableOrchestrationStatus] = []
    token: str | None = None
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for _ in range(MAX_PAGES):
            headers = {TOKEN: token} if token else {}
            async with session.get(f"{base}instances/", params=params, headers=headers) as response:
                if response.status != 200:
                    raise InstanceQueryError(f"listing orchestration instances: HTTP {response.status}")
                page = await response.json()
                following = response.headers.get(TOKEN)
            found += [DurableOrchestrationStatus.from_json(status) for status in page]
            # A page may be short and still have a successor; only a missing (or "null") token ends it.
            if not following or following == "null" or following == token:
                return found
            token = following
    raise InstanceQueryError(f"more than {MAX_PAGES * page_size} orchestration instances; purge old history")


async def pipeline_runs(client: df.DurableOrchestrationClient) -> list[DurableOrchestrationStatus]:
    """The fine-tune runs among them (not their wait steps, not the bot's deliveries)."""
    return [s for s in await list_instances(client) if (s.name or "").lower() == PIPELINE]
