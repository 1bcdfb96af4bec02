"""A readable transcript of what the app asked Azure: one line per request, in order.

Each line is ``METHOD path  api-version → status  key body fields``, with run-specific values
(subscription, names, GUIDs, ports) replaced by placeholders so two runs of the same pipeline give
the same text. Token issuance, cloud discovery and the SDK's background operation polls are left
out (they depend on caching and timing); so are repeats of the same line in a row (how many
status polls a wait needs depends on timing too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

from .arm import BUILTIN_ROLES
from .server import Exchange

HIDDEN_ROUTES = {
    "cloud-metadata",
    "openid-configuration",
    "token",
    "operation-status",
    "operation-result",
    "template-deployment-operations",  # azure-ai-ml's progress printer, on its own 5-second clock
}


def _role(definition: str) -> str:
    return BUILTIN_ROLES.get(definition.rsplit("/", 1)[-1].lower(), definition)


def _pick(body: dict | None, *paths: str) -> dict:
    out = {}
    for path in paths:
        node = body
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[path.split(".")[-1]] = node
    return out


def _template(body: dict) -> dict:
    params = ((body or {}).get("properties") or {}).get("parameters") or {}
    keep = (
        "workspaceName",
        "kind",
        "location",
        "containerRegistryOption",
        "storageAccountOption",
        "workspace_hub",
    )
    return {k: params[k]["value"] for k in keep if (params.get(k) or {}).get("value") not in (None, "")}


def _job(body: dict) -> dict:
    props = (body or {}).get("properties") or {}
    if props.get("jobType") == "FineTuning":
        details = props.get("fineTuningDetails") or {}
        return {
            "jobType": "FineTuning",
            "computeId": props.get("computeId"),
            "taskType": details.get("taskType"),
            "model": (details.get("model") or {}).get("uri"),
            "trainingData": (details.get("trainingData") or {}).get("uri"),
            "validationData": (details.get("validationData") or {}).get("uri"),
            "hyperParameters": details.get("hyperParameters"),
            "outputs": sorted(props.get("outputs") or {}),
        }
    nodes = props.get("jobs") or {}
    node = next(iter(nodes.values()), {})
    inputs = node.get("inputs") or {}
    return {
        "jobType": props.get("jobType"),
        "component": node.get("componentId"),
        "inputs": sorted(inputs),
        "compute": sorted({(v or {}).get("value") for k, v in inputs.items() if k.startswith("compute_")}),
        "outputs": sorted(props.get("outputs") or {}),
    }


def _traffic_or_identity(body: dict) -> dict:
    out = _pick(body, "properties.authMode", "properties.traffic", "identity.type")
    out["tags"] = sorted((body or {}).get("tags") or {})
    return out


KEY_FIELDS: dict[tuple[str, str], Callable[[dict], dict]] = {
    ("PUT", "resource-group"): lambda b: _pick(b, "location"),
    ("PUT", "container-registry"): lambda b: _pick(b, "location", "sku.name"),
    ("PUT", "template-deployment"): _template,
    ("PUT", "identity"): lambda b: _pick(b, "location"),
    ("PUT", "role-assignment"): lambda b: {
        "role": _role(_pick(b, "properties.roleDefinitionId").get("roleDefinitionId", "")),
        **_pick(b, "properties.principalType"),
    },
    ("PUT", "data-version"): lambda b: _pick(b, "properties.dataType", "properties.dataUri"),
    ("PUT", "compute"): lambda b: _pick(
        b,
        "properties.computeType",
        "properties.properties.vmSize",
        "properties.properties.vmPriority",
        "properties.properties.scaleSettings",
    ),
    ("PUT", "job"): _job,
    ("PUT", "model-version"): lambda b: _pick(b, "properties.modelType", "properties.modelUri"),
    ("PUT", "online-endpoint"): _traffic_or_identity,
    ("PUT", "online-deployment"): lambda b: _pick(
        b,
        "properties.model",
        "properties.instanceType",
        "sku.capacity",
        "properties.requestSettings.requestTimeout",
        "properties.livenessProbe.initialDelay",
        "properties.endpointComputeType",
    ),
    ("PUT", "connection"): lambda b: {
        **_pick(b, "properties.category", "properties.authType"),
        "secrets": sorted((((b or {}).get("properties") or {}).get("credentials") or {}).get("keys") or {}),
    },
    ("PUT", "serverless-endpoint"): lambda b: _pick(b, "properties.modelSettings.modelId", "sku.name"),
    ("POST", "scoring"): lambda b: {
        "messages": len(((b or {}).get("input_data") or {}).get("input_string") or [])
    },
    ("POST", "serverless-chat"): lambda b: {"messages": len((b or {}).get("messages") or [])},
    ("POST", "flow-create"): lambda b: _pick(b, "flowType", "flowName", "flowDefinitionFilePath"),
}


class Placeholders:
    """Run-specific values → stable names, in the order they first appear."""

    def __init__(self, fixed: dict[str, str]):
        self.fixed = dict(sorted(fixed.items(), key=lambda kv: -len(kv[0])))
        self.guids: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        for value, name in self.fixed.items():
            if value:
                text = re.sub(re.escape(value), name, text, flags=re.IGNORECASE)
        text = re.sub(r"https://127\.0\.0\.1:\d+", "{fake}", text)
        text = re.sub(r"http://127\.0\.0\.1:\d+", "{azurite}", text)
        text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z?", "{time}", text)
        text = re.sub(
            r"-\d\d-\d\d-\d{4}-\d\d-\d\d-\d\d(?=[\s/\"])", "-{stamp}", text
        )  # pfazure's flow folder
        text = re.sub(
            r"(/Microsoft\.Resources/deployments/[^/\s]+?)-\d+(?=[\s/])", r"\1-{n}", text
        )  # azure-ai-ml's random ARM deployment suffix: randint(1, 10_000_000), so 1 to 8 digits

        def guid(m: re.Match) -> str:
            return self.guids.setdefault(m.group(0).lower(), f"{{guid{len(self.guids) + 1}}}")

        text = re.sub(
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", guid, text, flags=re.IGNORECASE
        )
        return re.sub(r"/[0-9a-f]{16}/", "/{sha16}/", text)


def line(exchange: Exchange, placeholders: Placeholders) -> str:
    fields = KEY_FIELDS.get((exchange.method, exchange.route))
    extra = ""
    if fields and isinstance(exchange.request_body, dict | type(None)):
        extra = "  " + json.dumps(fields(exchange.request_body or {}), sort_keys=True)
    version = f"  api-version={exchange.api_version}" if exchange.api_version else ""
    text = f"{exchange.method:6} {exchange.path}{version} → {exchange.status}{extra}"
    return placeholders(text)


def render(exchanges: Iterable[Exchange], placeholders: Placeholders) -> str:
    lines: list[str] = []
    for exchange in exchanges:
        if exchange.route in HIDDEN_ROUTES:
            continue
        text = line(exchange, placeholders)
        if not lines or lines[-1] != text:
            lines.append(text)
    return "\n".join(lines) + "\n"
