"""The deployed endpoints' inference hosts.

Managed online endpoints speak Azure ML's MLflow chat contract (the same pydantic models the app's
scoring client builds requests with): ``Authorization: Bearer <key>``, routed by traffic weight or
the ``azureml-model-deployment`` header; with no traffic and no header Azure answers 424 "No valid
deployments to route to". Serverless endpoints speak the Azure AI model inference API
(``/chat/completions``, OpenAI-shaped). Every answered request counts in the endpoint's
RequestsPerMinute metric, which is what the cleanup timer reads to decide that an endpoint is idle.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .endpoints import ONLINE, SERVERLESS, find_by_scoring_name
from .server import ArmError, Request, Response

if TYPE_CHECKING:
    from .azure import FakeAzure

DEPLOYMENT_HEADER = "azureml-model-deployment"


def register(fake: FakeAzure) -> None:
    s = fake.server
    s.add(
        "scoring",
        "POST",
        r"/inference/(?P<region>[^/]+)/(?P<ep>[^/]+)/score",
        lambda r, m: _score(fake, r, m),
        auth="custom",
    )
    s.add(
        "serverless-chat",
        "POST",
        r"/serverless/(?P<region>[^/]+)/(?P<ep>[^/]+)(?:/v1)?/chat/completions",
        lambda r, m: _chat(fake, r, m),
        auth="custom",
    )


def _authorize(fake: FakeAzure, req: Request, endpoint: dict) -> None:
    keys = fake.endpoint_keys.get(endpoint["id"].lower(), {})
    given = req.headers.get("authorization", "")
    given = given[7:] if given.lower().startswith("bearer ") else (given or req.headers.get("api-key", ""))
    if not given or given not in keys.values():
        raise ArmError(401, "Unauthorized", "Invalid key or token for this endpoint.")


def _count_request(fake: FakeAzure, endpoint: dict) -> None:
    minute = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:00Z")
    series = fake.requests_per_minute.setdefault(endpoint["id"].lower(), [])
    if series and series[-1][0] == minute:
        series[-1] = (minute, series[-1][1] + 1)
    else:
        series.append((minute, 1))


def _route(fake: FakeAzure, req: Request, endpoint: dict) -> dict:
    wanted = req.headers.get(DEPLOYMENT_HEADER)
    traffic = endpoint["properties"].get("traffic") or {}
    if not wanted:
        live = sorted(((share, name) for name, share in traffic.items() if share > 0), reverse=True)
        if not live:
            raise ArmError(
                424,
                "NoValidDeployments",
                "No valid deployments to route to. Please check that the endpoint has at least one "
                "deployment with "
                "positive weight values or use a deployment specific header to route.",
            )
        wanted = live[0][1]
    deployment = fake.store.find(f"{endpoint['id']}/deployments/{wanted}")
    if deployment is None or deployment["properties"]["provisioningState"] != "Succeeded":
        raise ArmError(
            404, "DeploymentNotFound", f"Deployment '{wanted}' not found or not ready on this endpoint."
        )
    return deployment


def _score(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    from backends.scoring import InvalidScoringRequest, validate_scoring_request

    endpoint = find_by_scoring_name(fake, ONLINE, m["region"], m["ep"])
    _authorize(fake, req, endpoint)
    deployment = _route(fake, req, endpoint)
    try:
        body = validate_scoring_request(req.body)
    except InvalidScoringRequest as exc:
        raise ArmError(
            400, "BadRequest", f"A value is not valid for the 'input_data' parameter: {exc}"
        ) from None
    _count_request(fake, endpoint)
    question = body.input_data.input_string[-1].content
    model = deployment["properties"].get("model", "").rsplit("/models/", 1)[-1]
    return Response(
        200, {"output": f'[{model}] Thanks for asking. About "{question[:200]}": here is what I know.'}
    )


def _chat(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    endpoint = find_by_scoring_name(fake, SERVERLESS, m["region"], m["ep"])
    _authorize(fake, req, endpoint)
    if endpoint["properties"]["provisioningState"] != "Succeeded":
        raise ArmError(503, "ServiceUnavailable", "The endpoint is still being deployed.")
    body = req.body if isinstance(req.body, dict) else {}
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ArmError(400, "BadRequest", "'messages' is required: a list of {role, content}")
    _count_request(fake, endpoint)
    question = str(messages[-1].get("content", ""))
    answer = f'Thanks for asking. About "{question[:200]}": here is what I know.'
    return Response(
        200,
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": "phi-3-mini-4k-instruct-finetuned",
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}
            ],
            "usage": {"prompt_tokens": len(question.split()), "completion_tokens": len(answer.split())},
        },
    )
