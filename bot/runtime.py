"""Builds the bot and its collaborators once, from settings (the composition root of ``bot/``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from botbuilder.core import ConversationState, Storage
from botbuilder.integration.aiohttp import CloudAdapter
from botframework.connector.auth import ServiceClientCredentialsFactory

from backends.factory import get_backend
from backends.protocol import MLBackend
from backends.scoring import ScoringClient
from bot.adapter import MessagesEndpoint, create_adapter, turn_error_handler
from bot.answers import ChatService
from bot.commands import Commands
from bot.conversation import AppConversationState, ConversationMemories, HistoryBound
from bot.dedupe import ActivityLedger
from bot.endpoints import EndpointDirectory
from bot.phi3_bot import BotOptions, Phi3Bot
from bot.proactive import ProactiveAnswers
from bot.routes import ChatRoute, DirectRoute, FlowRoute
from bot.storage import BlobStore, MemoryStore
from settings import AppSettings, get_settings


@dataclass
class BotRuntime:
    settings: AppSettings
    store: Storage
    conversation_state: ConversationState
    directory: EndpointDirectory
    chat: ChatService
    proactive: ProactiveAnswers
    bot: Phi3Bot
    adapter: CloudAdapter
    endpoint: MessagesEndpoint
    scoring: ScoringClient

    async def close(self) -> None:
        """Close this event loop's HTTP sessions (the scoring client's and the blob store's)."""
        await self.scoring.close()
        if isinstance(self.store, BlobStore):
            await self.store.close()


def create_store(settings: AppSettings) -> Storage:
    """Memory, or blob: an explicit account URL (with the app's identity), else a connection string
    (BOT_STATE_CONNECTION_STRING, else the host's AzureWebJobsStorage), else the host's
    identity-based storage account."""
    if settings.bot_state_store_kind == "memory":
        return MemoryStore()
    account_url = settings.bot_state_account_url
    secret = settings.bot_state_connection_string or settings.azure_webjobs_storage
    if not account_url and not secret and settings.azure_webjobs_storage_account:
        account_url = f"https://{settings.azure_webjobs_storage_account}.blob.core.windows.net"
    if account_url:
        from azure.identity.aio import DefaultAzureCredential

        return BlobStore(
            settings.bot_state_container, account_url=account_url, credential=DefaultAzureCredential()
        )
    return BlobStore(
        settings.bot_state_container, connection_string=secret.get_secret_value() if secret else None
    )


def create_routes(settings: AppSettings, scoring: ScoringClient) -> dict[str, ChatRoute]:
    direct = DirectRoute(
        scoring,
        temperature=settings.bot_temperature,
        max_new_tokens=settings.bot_max_new_tokens,
        timeout_s=settings.bot_model_timeout_s,
    )
    flow = FlowRoute(
        temperature=settings.bot_temperature,
        max_new_tokens=settings.bot_max_new_tokens,
        timeout_s=settings.bot_model_timeout_s,
        state_dir=settings.state_dir,
    )
    return {"direct": direct, "flow": flow}


def create_runtime(
    settings: AppSettings,
    *,
    backend: Callable[[], MLBackend] = get_backend,
    store: Storage | None = None,
    routes: dict[str, ChatRoute] | None = None,
    credentials_factory: ServiceClientCredentialsFactory | None = None,
) -> BotRuntime:
    store = store or create_store(settings)
    conversation_state = AppConversationState(store)
    memories = ConversationMemories(conversation_state)
    bound = HistoryBound(settings.bot_history_turns, settings.bot_history_chars)
    directory = EndpointDirectory(backend, endpoint_name=settings.bot_endpoint_name)
    scoring = ScoringClient(timeout_s=settings.bot_model_timeout_s)
    chat = ChatService(
        directory, routes or create_routes(settings, scoring), timeout_s=settings.bot_model_timeout_s
    )
    proactive = ProactiveAnswers(store, chat, memories, bound, app_id=settings.microsoft_app_id)
    options = BotOptions(
        default_route=settings.bot_route,
        ack_after_s=settings.bot_ack_after_s,
        max_question_chars=settings.bot_max_question_chars,
        bound=bound,
    )
    bot = Phi3Bot(
        memories,
        chat,
        Commands(directory, settings.bot_route),
        proactive,
        ActivityLedger(store),  # type: ignore[arg-type]  # MemoryStore and BlobStore both claim
        options,
    )
    adapter = create_adapter(settings, credentials_factory=credentials_factory)
    adapter.on_turn_error = turn_error_handler(conversation_state)
    return BotRuntime(
        settings=settings,
        store=store,
        conversation_state=conversation_state,
        directory=directory,
        chat=chat,
        proactive=proactive,
        bot=bot,
        adapter=adapter,
        endpoint=MessagesEndpoint(adapter),
        scoring=scoring,
    )


_lock = threading.Lock()
_runtime: BotRuntime | None = None


def get_runtime() -> BotRuntime:
    """The app's one bot runtime (built on first use, so importing function_app stays cheap)."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = create_runtime(get_settings())
        return _runtime
