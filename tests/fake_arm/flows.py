"""The Prompt flow service of a workspace (Azure AI Foundry project): create, get and list flows.

Its base URL is the text before ``discovery`` in the workspace's ``discoveryUrl`` (the fake's own
address), as promptflow-azure derives it. Flows are listed through the index service, as
``pfazure flow list`` does.

Rules enforced: an ARM token from this fake's Entra ID; the workspace exists; ``flowType`` is one
of the service's (default, evaluation, chat); ``flowDefinitionFilePath`` names a file that was
uploaded to the workspace's ``workspaceworkingdirectory`` share and parses as a flow with nodes,
and a chat flow declares a chat input and a chat output (400 otherwise).
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

import yaml

from .server import ArmError, Request, Response, not_found
from .store import now_iso
from .workspace import WS, workspace

if TYPE_CHECKING:
    from .azure import FakeAzure

FLOW_TYPES = {"default": "Default", "evaluation": "Evaluation", "chat": "Chat"}
WORKING_DIRECTORY = "workspaceworkingdirectory"


def register(fake: FakeAzure) -> None:
    s = fake.server
    flows = r"/flow/api" + WS + r"/Flows"
    s.add("flow-create", "POST", flows, lambda r, m: _create(fake, r, m))
    s.add("flow", "GET", flows + r"/(?P<flow>[^/]+)", lambda r, m: _get(fake, r, m))
    s.add("flow-index", "POST", r"/index/v1\.0" + WS + r"/entities", lambda r, m: _index(fake, r, m))


def working_share(fake: FakeAzure, ws: dict):
    """The workspace's working-directory file share (where the portal and pfazure keep flows)."""
    store = fake.store.get(f"{ws['id']}/datastores/{WORKING_DIRECTORY}", "datastore")
    props = store["properties"]
    return fake.files.share(props["accountName"], props["fileShareName"])


def _create(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    grant = fake.server.check_bearer(req)
    ws = workspace(fake, m)
    body = req.json()
    flow_type = FLOW_TYPES.get(str(body.get("flowType", "")).lower())
    if flow_type is None:
        raise ArmError(
            400, "UserError", f"flowType '{body.get('flowType')}' is not one of {sorted(FLOW_TYPES)}"
        )
    if not body.get("flowName"):
        raise ArmError(400, "UserError", "flowName is required")
    path = str(body.get("flowDefinitionFilePath") or "")
    share = working_share(fake, ws)
    source = share.files.get(path) if share else None
    if source is None:
        raise ArmError(
            400, "UserError", f"flowDefinitionFilePath '{path}' is not a file in {WORKING_DIRECTORY}"
        )
    _check_definition(path, bytes(source), flow_type)
    flow_id = str(uuid.uuid4())
    guid = ws["properties"]["workspaceId"]
    dto = {
        "flowId": flow_id,
        "flowName": body["flowName"],
        "flowType": flow_type,
        "description": body.get("description"),
        "tags": body.get("tags") or {},
        "flowDefinitionFilePath": path,
        "experimentId": guid,
        "createdDate": now_iso(),
        "lastModifiedDate": now_iso(),
        "owner": {
            "userObjectId": fake.app.object_id,
            "userTenantId": grant["tenant"],
            "userName": "phi3-app",
        },
        "flowResourceId": f"azureml://locations/{ws['location']}/workspaces/{guid}/flows/{flow_id}",
        "isArchived": False,
        "studioPortalEndpoint": f"https://ai.azure.test/projectflows/{flow_id}/{guid}/details/Flow?wsid={ws['id']}",
    }
    fake.flows.setdefault(ws["id"].lower(), {})[flow_id] = dto
    fake.record(f"flow {body['flowName']} created in {ws['name']}")
    return Response(200, dto)


def _check_definition(path: str, source: bytes, flow_type: str) -> None:
    try:
        definition = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise ArmError(400, "UserError", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(definition, dict) or not definition.get("nodes"):
        raise ArmError(400, "UserError", f"{path} defines no nodes")
    if flow_type == "Chat":
        inputs = (definition.get("inputs") or {}).values()
        outputs = (definition.get("outputs") or {}).values()
        if not any(i.get("is_chat_input") for i in inputs) or not any(
            o.get("is_chat_output") for o in outputs
        ):
            raise ArmError(
                400,
                "UserError",
                "a chat flow needs an input with is_chat_input and an output with is_chat_output",
            )


def _get(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    dto = fake.flows.get(ws["id"].lower(), {}).get(m["flow"])
    if dto is None:
        raise not_found("flow", m["flow"])
    return Response(200, dto)


def _index(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    """The index service's entity search, for the filters ``pfazure flow list`` sends."""
    ws = workspace(fake, m)
    filters = {f["field"]: set(f["values"]) for f in req.json().get("filters", [])}
    if filters.get("type") != {"flows"}:
        raise ArmError(400, "UserError", "only type=flows is indexed by the fake")
    archived = filters.get("annotations/isArchived", {"false"})
    owners = filters.get("properties/creationContext/createdBy/userObjectId")
    found = [
        dto
        for dto in fake.flows.get(ws["id"].lower(), {}).values()
        if str(dto["isArchived"]).lower() in archived
        and (owners is None or dto["owner"]["userObjectId"] in owners)
    ]
    found.sort(key=lambda d: d["createdDate"], reverse=True)
    return Response(200, {"value": [_entity(ws, d) for d in found], "totalCount": len(found)})


def _entity(ws: dict, dto: dict) -> dict:
    return {
        "entityId": f"azureml://location/{ws['location']}/workspaceId/{dto['experimentId']}/type/flows/objectId/{dto['flowId']}",
        "properties": {
            "flowId": dto["flowId"],
            "flowType": dto["flowType"],
            "flowDefinitionFilePath": dto["flowDefinitionFilePath"],
            "creationContext": {"createdTime": dto["createdDate"], "createdBy": dto["owner"]},
        },
        "annotations": {
            "flowName": dto["flowName"],
            "description": dto["description"],
            "tags": dto["tags"],
            "owner": dto["owner"],
            "isArchived": dto["isArchived"],
            "createdDate": dto["createdDate"],
        },
    }
