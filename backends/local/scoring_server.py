"""One local online endpoint: serves its deployments' MLflow models on loopback with Azure ML's contract.

Run as ``python -m backends.local.scoring_server <endpoint_dir>``. The folder holds the state that
``backends.local.endpoints`` writes (``endpoint.json``, ``keys.json``) and that this process writes
(``server.json`` once listening, ``last_used`` touched on scoring). SIGHUP re-reads both files
without closing the listening socket; SIGTERM stops the server.

aiohttp rather than Starlette + uvicorn: the scoring client and the test stubs already use it, its
``client_max_size`` gives the 413 for free, and ``AppRunner``/``TCPSite`` let us bind first and
only then announce ``server.json``, with our own signal handlers and no server framework's
signal handling to work around.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import ValidationError

from backends.local.endpoint_state import (
    DeploymentConfig,
    EndpointConfig,
    ServerRecord,
    process_identity,
    read_endpoint_config,
    read_keys,
    write_json_atomic,
)
from backends.scoring import (
    DEFAULT_MAX_NEW_TOKENS,
    DEPLOYMENT_HEADER,
    InvalidScoringRequest,
    ScoringParameters,
    validate_scoring_request,
)

log = logging.getLogger("backends.local.scoring_server")

MAX_REQUEST_BYTES = 1024 * 1024
LAST_USED_EVERY_S = 5.0
LoadState = Literal["Loading", "Ready", "Failed"]


@dataclass
class Deployment:
    """A deployment as this process serves it. ``model`` outlives a reload so updates roll."""

    name: str
    config: DeploymentConfig
    state: LoadState = "Loading"
    error: str | None = None
    model: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # One worker: even a request whose waiter was cancelled cannot run beside the next one.
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    load_task: asyncio.Task[None] | None = None

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "model_uri": self.config.model_uri,
            "revision": self.config.revision,
            "error": self.error,
        }

    def close(self) -> None:
        if self.load_task is not None:
            self.load_task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


class TrafficRouter:
    """Smooth weighted round robin: deterministic, and exact proportions over every cycle."""

    def __init__(self, traffic: dict[str, int]) -> None:
        self._weights = {name: weight for name, weight in traffic.items() if weight > 0}
        self._current = dict.fromkeys(self._weights, 0)

    def pick(self) -> str | None:
        if not self._weights:
            return None
        for name, weight in self._weights.items():
            self._current[name] += weight
        chosen = max(self._current, key=self._current.__getitem__)
        self._current[chosen] -= sum(self._weights.values())
        return chosen


def _load_model(model_uri: str) -> Any:
    import mlflow.pyfunc  # imported here: it takes seconds, and the socket should be up first

    return mlflow.pyfunc.load_model(model_uri)


def _first_answer(result: Any, deployment: str) -> str:
    answers = result.tolist() if hasattr(result, "tolist") else result
    if isinstance(answers, list | tuple) and answers and isinstance(answers[0], str):
        return answers[0]
    raise TypeError(
        f"deployment {deployment!r}: predict returned {type(result).__name__}, expected list[str]"
    )


def bounded_parameters(parameters: ScoringParameters, limit: int) -> dict[str, Any]:
    """The predict params with max_new_tokens clamped to the deployment's limit."""
    values = parameters.for_predict()
    values["max_new_tokens"] = min(values.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), limit)
    if "min_new_tokens" in values:
        values["min_new_tokens"] = min(values["min_new_tokens"], values["max_new_tokens"])
    return values


def _error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"error": {"code": code, "message": message, **extra}}
    return web.json_response(body, status=status, headers=headers)


class EndpointServer:
    def __init__(self, endpoint_dir: Path) -> None:
        self.endpoint_dir = endpoint_dir
        self.config: EndpointConfig = read_endpoint_config(endpoint_dir)
        self._keys: tuple[bytes, bytes] = self._read_keys()
        self.deployments: dict[str, Deployment] = {}
        self.router = TrafficRouter({})
        self._last_used_written = 0.0
        self.device = "cpu"
        # Not asyncio's default executor: asyncio.run() joins that one, and a stuck load must not
        # keep a stopped endpoint alive.
        # One loader thread: two first loads at once race inside transformers' lazy imports
        # ("cannot import name 'AutoModelForCausalLM'"), and 2 cores gain nothing from parallel loads.
        self._loaders = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")

    def _read_keys(self) -> tuple[bytes, bytes]:
        keys = read_keys(self.endpoint_dir)
        return keys.primary.get_secret_value().encode(), keys.secondary.get_secret_value().encode()

    # -- configuration -------------------------------------------------------------------------
    def apply_config(self) -> None:
        """Start loading new or changed deployments, drop removed ones, take the new traffic."""
        for name in list(self.deployments):
            if name not in self.config.deployments:
                log.info("deployment %s removed", name)
                self.deployments.pop(name).close()
        for name, wanted in self.config.deployments.items():
            current = self.deployments.get(name)
            if current is not None and current.config.revision == wanted.revision:
                current.config = wanted  # settings such as the token limit apply at once
                continue
            deployment = current or Deployment(name=name, config=wanted)
            deployment.config, deployment.state, deployment.error = wanted, "Loading", None
            if deployment.load_task is not None:
                deployment.load_task.cancel()
            deployment.load_task = asyncio.get_running_loop().create_task(self._load(deployment, wanted))
            self.deployments[name] = deployment
        self.router = TrafficRouter(
            {name: pct for name, pct in self.config.traffic.items() if name in self.deployments}
        )

    def reload(self) -> None:
        """SIGHUP: re-read endpoint.json and keys.json; a broken file keeps the previous state."""
        try:
            config = read_endpoint_config(self.endpoint_dir)
            keys = self._read_keys()
        except (OSError, ValueError, ValidationError) as error:
            log.error("reload ignored, keeping generation %s: %s", self.config.generation, error)
            return
        self.config, self._keys = config, keys
        self.apply_config()
        log.info("reloaded generation %s: traffic %s", config.generation, config.traffic)

    async def _load(self, deployment: Deployment, wanted: DeploymentConfig) -> None:
        log.info(
            "deployment %s: loading %s (revision %s)", deployment.name, wanted.model_uri, wanted.revision
        )
        started = time.monotonic()
        try:
            model = await asyncio.get_running_loop().run_in_executor(
                self._loaders, _load_model, wanted.model_uri
            )
        except Exception as error:  # any failure of a user's model must become a Failed state
            log.exception("deployment %s: could not load %s", deployment.name, wanted.model_uri)
            if self._is_current(deployment, wanted):
                deployment.state, deployment.error = "Failed", f"{type(error).__name__}: {error}"[:500]
            return
        if not self._is_current(deployment, wanted):
            log.info("deployment %s: revision %s loaded but superseded", deployment.name, wanted.revision)
            return
        deployment.model, deployment.state = model, "Ready"
        self.device = _device(model)
        log.info("deployment %s: ready in %.1f s", deployment.name, time.monotonic() - started)

    def _is_current(self, deployment: Deployment, loaded: DeploymentConfig) -> bool:
        return (
            self.deployments.get(deployment.name) is deployment
            and deployment.config.revision == loaded.revision
        )

    def close(self) -> None:
        for deployment in self.deployments.values():
            deployment.close()
        self._loaders.shutdown(wait=False, cancel_futures=True)

    # -- HTTP ------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        application = web.Application(client_max_size=MAX_REQUEST_BYTES)
        application.router.add_post("/score", self.score)
        application.router.add_get("/health", self.health)
        return application

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        presented = token.strip().encode()
        # Compare against both keys every time so timing does not reveal which one matched.
        matches = [hmac.compare_digest(presented, key) for key in self._keys]
        return any(matches)

    def _route(self, requested: str | None) -> Deployment | web.Response:
        name = requested.strip() if requested else self.router.pick()
        if name is None:
            return _error(
                503,
                "NoTraffic",
                f"no deployment receives traffic on endpoint {self.config.name!r}: set the endpoint's "
                f"traffic or send the {DEPLOYMENT_HEADER!r} header",
            )
        deployment = self.deployments.get(name)
        if deployment is None:
            known = ", ".join(sorted(self.deployments)) or "none"
            return _error(
                404,
                "DeploymentNotFound",
                f"deployment {name!r} not found on endpoint {self.config.name!r} (deployments: {known})",
            )
        if deployment.model is None:
            if deployment.state == "Failed":
                return _error(
                    503, "DeploymentFailed", f"deployment {name!r} failed to load: {deployment.error}"
                )
            return _error(
                503,
                "DeploymentLoading",
                f"deployment {name!r} is still loading",
                headers={"Retry-After": "5"},
            )
        return deployment

    async def score(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "Unauthorized", "missing or wrong key: send 'Authorization: Bearer <key>'")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "PayloadTooLarge", f"request body is over {MAX_REQUEST_BYTES} bytes")
        try:
            scoring_request = validate_scoring_request(json.loads(raw))
        except ValueError as error:  # JSON syntax errors and contract violations alike
            problems = (
                error.problems if isinstance(error, InvalidScoringRequest) else [f"body: not JSON ({error})"]
            )
            return _error(400, "BadRequest", "; ".join(problems), problems=problems)
        routed = self._route(request.headers.get(DEPLOYMENT_HEADER))
        if isinstance(routed, web.Response):
            return routed
        self._touch_last_used()
        data = scoring_request.input_data
        messages = [message.model_dump() for message in data.input_string]
        params = bounded_parameters(data.parameters, routed.config.max_new_tokens_limit)
        return await self._predict(routed, messages, params)

    async def _predict(
        self, deployment: Deployment, messages: list[dict[str, str]], params: dict[str, Any]
    ) -> web.Response:
        model, loop = deployment.model, asyncio.get_running_loop()

        async def serialised() -> Any:
            async with deployment.lock:
                return await loop.run_in_executor(
                    deployment.executor, lambda: model.predict(messages, params=params)
                )

        timeout_s = deployment.config.request_timeout_ms / 1000
        try:
            answer = _first_answer(await asyncio.wait_for(serialised(), timeout_s), deployment.name)
        except TimeoutError:
            return _error(
                408, "RequestTimeout", f"deployment {deployment.name!r} did not answer in {timeout_s:g} s"
            )
        except Exception as error:  # a model's failure is the client's 500, not the server's crash
            log.exception("deployment %s: predict failed", deployment.name)
            message = f"deployment {deployment.name!r} failed: {type(error).__name__}: {error}"[:500]
            return _error(500, "ModelError", message)
        return web.json_response({"output": answer}, headers={DEPLOYMENT_HEADER: deployment.name})

    def _touch_last_used(self) -> None:
        now, marker = time.time(), self.endpoint_dir / "last_used"
        if now - self._last_used_written >= LAST_USED_EVERY_S or not marker.exists():
            marker.touch()
            self._last_used_written = now

    async def health(self, request: web.Request) -> web.Response:
        states = [d.state for d in self.deployments.values()]
        return web.json_response(
            {
                "status": "Healthy" if all(state == "Ready" for state in states) else "Degraded",
                "endpoint": self.config.name,
                "generation": self.config.generation,
                "deployments": {name: d.health() for name, d in self.deployments.items()},
                "device": self.device,
            }
        )


def _device(model: Any) -> str:
    """Where the loaded model's weights are (asked after loading, so torch is already imported)."""
    try:
        weights = model.unwrap_python_model().model  # our ChatCompletionModel's transformers model
        return str(next(weights.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        pass  # another kind of pyfunc: fall back to what this process can use
    torch = sys.modules.get("torch")
    return "cuda:0" if torch is not None and torch.cuda.is_available() else "cpu"


async def serve(endpoint_dir: Path) -> None:
    server = EndpointServer(endpoint_dir)
    loop, stopping = asyncio.get_running_loop(), asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    runner = web.AppRunner(
        server.app(),
        access_log_format='%a "%r" %s %b %Tfs deployment=%{azureml-model-deployment}o',
        shutdown_timeout=5,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", server.config.port)
    try:
        await site.start()
    except OSError as error:
        raise SystemExit(
            f"endpoint {server.config.name}: cannot listen on 127.0.0.1:{server.config.port}: {error}"
        ) from None
    server.apply_config()
    pid = os.getpid()
    record = ServerRecord(
        pid=pid, port=server.config.port, started_at=datetime.now(UTC), **process_identity(pid)
    )
    write_json_atomic(endpoint_dir / "server.json", record.model_dump(mode="json"))
    log.info("endpoint %s listening on 127.0.0.1:%s (pid %s)", server.config.name, server.config.port, pid)
    await stopping.wait()
    log.info("endpoint %s stopping", server.config.name)
    await runner.cleanup()
    server.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m backends.local.scoring_server <endpoint_dir>")
    # Models must never reach for the Hugging Face hub from a serving process.
    os.environ["HF_HUB_OFFLINE"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(Path(args[0]).resolve()))
    logging.shutdown()
    # The listener is closed and nothing is left to flush. Skip interpreter teardown: it would join
    # a load or predict thread stuck in native code, and unloading torch/MLflow takes seconds.
    os._exit(0)


if __name__ == "__main__":
    main()
