"""The bot's functions: ``POST /api/messages`` and the Durable delivery of slow answers.

    POST /api/messages          Bot Framework messaging endpoint (Teams, Web Chat, Direct Line)
    bot_proactive_answer        orchestration: deliver one pending answer (input: its store key)
    bot_deliver_answer          activity: answer, post it with continue_conversation, remember it
    bot_purge_deliveries        timer (hourly): purge the Durable history of finished deliveries

The route is anonymous at the Functions level: the Bot Framework JWT (checked in ``bot.adapter``)
is the guard, and channels cannot add a function key.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import azure.durable_functions as df
import azure.functions as func
from botbuilder.core import TurnContext

from bot.commands import DurableRunStatus
from bot.phi3_bot import TURN_SERVICES, TurnServices
from bot.proactive import DELIVERY_INSTANCE_PREFIX, delivery_instance_id
from bot.runtime import get_runtime
from orchestrators.instances import list_instances
from settings import get_settings

log = logging.getLogger("bot.deliveries")

bp = df.Blueprint()

DELIVERY_ORCHESTRATION = "bot_proactive_answer"
DELIVERY_ACTIVITY = "bot_deliver_answer"
# Delivery fails only when the channel cannot be reached; the answer itself is kept between tries.
DELIVERY_RETRY = df.RetryOptions(first_retry_interval_in_milliseconds=5000, max_number_of_attempts=3)


class DurableAnswerScheduler:
    """Schedules a pending answer's delivery as one Durable orchestration instance."""

    def __init__(self, client: df.DurableOrchestrationClient) -> None:
        self.client = client

    async def schedule(self, pending_key: str) -> None:
        await self.client.start_new(
            DELIVERY_ORCHESTRATION, delivery_instance_id(pending_key), {"pending_key": pending_key}
        )


@bp.route(route="messages", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
@bp.durable_client_input(client_name="client")
async def messages(req: func.HttpRequest, client: df.DurableOrchestrationClient) -> func.HttpResponse:
    runtime = get_runtime()
    services = TurnServices(runs=DurableRunStatus(client), scheduler=DurableAnswerScheduler(client))

    async def logic(turn_context: TurnContext) -> None:
        turn_context.turn_state[TURN_SERVICES] = services
        await runtime.bot.on_turn(turn_context)

    return await runtime.endpoint.handle(req, logic)


@bp.orchestration_trigger(context_name="context", orchestration=DELIVERY_ORCHESTRATION)
def bot_proactive_answer(context: df.DurableOrchestrationContext):
    report = yield context.call_activity_with_retry(DELIVERY_ACTIVITY, DELIVERY_RETRY, context.get_input())
    return report


@bp.activity_trigger(input_name="pending", activity=DELIVERY_ACTIVITY)
async def bot_deliver_answer(pending: dict) -> dict:
    runtime = get_runtime()
    report = await runtime.proactive.deliver(runtime.adapter, pending["pending_key"])
    return report.model_dump()


# Every slow answer leaves one finished instance behind; the hub would grow without end, and each
# listing of runs would page through them all. A failed delivery is kept as the record of an answer
# that never reached its user.
PURGE_SCHEDULE = "0 23 * * * *"  # hourly
PURGED_STATES = [df.OrchestrationRuntimeStatus.Completed, df.OrchestrationRuntimeStatus.Terminated]


async def purge_finished_deliveries(client: df.DurableOrchestrationClient, older_than: datetime) -> int:
    """Purge the deliveries that finished and were created before ``older_than``; how many went.

    Every page of the query is read (``list_instances`` follows the continuation token: a page may
    be empty and still have a successor, which the SDK's ``get_status_by`` would take for the end).
    """
    finished = await list_instances(
        client,
        instance_id_prefix=DELIVERY_INSTANCE_PREFIX,
        runtime_status=PURGED_STATES,
        created_time_to=older_than,
    )
    purged = 0
    for status in finished:
        if status.instance_id:
            result = await client.purge_instance_history(status.instance_id)
            purged += result.instances_deleted
    return purged


@bp.timer_trigger(schedule=PURGE_SCHEDULE, arg_name="timer", run_on_startup=False, use_monitor=True)
@bp.durable_client_input(client_name="client")
async def bot_purge_deliveries(timer: func.TimerRequest, client: df.DurableOrchestrationClient) -> None:
    hours = get_settings().bot_delivery_history_hours
    count = await purge_finished_deliveries(client, datetime.now(UTC) - timedelta(hours=hours))
    log.info("bot deliveries purged=%d kept_hours=%s", count, hours)
