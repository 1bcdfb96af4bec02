"""Call user functions the way the Python worker does.

The worker calls ``fn(**kwargs)`` with binding names as keys, awaits coroutine functions on its
event loop and runs sync ones in a thread pool. A parameter literally named ``context`` that is not
a binding receives a ``func.Context``. Durable client bindings receive the binding JSON string.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import timedelta
from typing import Any

import azure.functions as func
from azure.functions._abc import RetryContext, TraceContext

from .app_loader import FunctionSpec


class _TraceContext(TraceContext):
    @property
    def trace_state(self) -> str:
        return ""

    @property
    def trace_parent(self) -> str:
        return ""

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext(RetryContext):
    @property
    def retry_count(self) -> int:
        return 0

    @property
    def max_retry_count(self) -> int:
        return 0

    @property
    def exception(self):
        return None


class InvocationContext(func.Context):
    """The ``context`` argument of a function invocation."""

    _local = threading.local()

    def __init__(self, function_name: str, function_directory: str):
        self._invocation_id = str(uuid.uuid4())
        self._function_name = function_name
        self._function_directory = function_directory

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self):
        return self._local

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self) -> TraceContext:
        return _TraceContext()

    @property
    def retry_context(self) -> RetryContext:
        return _RetryContext()


class FunctionTimeoutError(Exception):
    """The invocation ran past host.json's functionTimeout (the host's FunctionTimeoutException)."""


class Invoker:
    """Runs functions: async ones on the host loop, sync ones in the thread pool."""

    def __init__(
        self,
        executor: Executor,
        client_binding: Callable[[], str],
        app_root: str,
        timeout_s: float | None = None,
    ):
        self._executor = executor
        self._client_binding = client_binding
        self._app_root = app_root
        self._timeout_s = timeout_s

    async def call(self, spec: FunctionSpec, trigger_value: Any) -> Any:
        """Run the function; past host.json's ``functionTimeout`` it fails as the host's does (a sync
        function's thread cannot be stopped: it runs on, and its result is dropped)."""
        if self._timeout_s is None:
            return await self._call(spec, trigger_value)
        try:
            return await asyncio.wait_for(self._call(spec, trigger_value), self._timeout_s)
        except TimeoutError:
            span = str(timedelta(seconds=self._timeout_s)).zfill(8)
            raise FunctionTimeoutError(
                f"Timeout value of {span} exceeded by function 'Functions.{spec.name}'"
            ) from None

    async def _call(self, spec: FunctionSpec, trigger_value: Any) -> Any:
        kwargs: dict[str, Any] = {spec.trigger_param: trigger_value}
        for name in spec.client_params:
            kwargs[name] = self._client_binding()
        if spec.wants_context:
            kwargs["context"] = InvocationContext(spec.name, self._app_root)
        if spec.is_async:
            return await spec.user_function(**kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(spec.user_function, **kwargs))
