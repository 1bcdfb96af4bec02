"""The bot's functions: ``POST /api/messages`` and the Durable delivery of slow answers.

    POST /api/messages          Bot Framework messaging endpoint (Teams, Web Chat, Direct Line)
    bot_proactive_answer        orchestration: deliver one pending answer (input: its store key)
    bot_deliver_answer          activity: answer, post it with continue_conversation, remember it

The route is anonymous at the Functions level: the Bot Framework JWT (checked in ``bot.adapter``)
is the guard, and channels cannot add a function key.
"""

from __future__ import annotations

import azure.durable_functions as df
import azure.functions as func
from botbuilder.core import TurnContext

from bot.commands import DurableRunStatus
from bot.phi3_bot import TURN_SERVICES, TurnServices
from bot.proactive import delivery_instance_id
from bot.runtime import get_runtime

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
