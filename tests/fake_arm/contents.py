"""Workspace contents: the default datastore, data assets and connections (Prompt flow's custom one).

Rules enforced: data asset versions are immutable (a second PUT of an existing version is 409); a
``CustomKeys`` connection needs ``authType`` CustomKeys and ``credentials.keys``, and its secrets are
never returned except by ``listsecrets``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .server import ArmError, Request, Response
from .store import arm_body, now_iso
from .workspace import WS, asset_versions, get_child, new_asset_version, workspace

if TYPE_CHECKING:
    from .azure import FakeAzure


def register(fake: FakeAzure) -> None:
    s = fake.server
    s.add("datastores", "GET", WS + r"/datastores", lambda r, m: _list_datastores(fake, r, m))
    s.add(
        "datastore",
        "GET",
        WS + r"/datastores/(?P<name>[^/]+)",
        lambda r, m: get_child(fake, r, m, "datastore"),
    )
    s.add(
        "datastore-secrets",
        "POST",
        WS + r"/datastores/(?P<name>[^/]+)/listSecrets",
        lambda r, m: _secrets(fake, m),
    )
    data = WS + r"/data/(?P<name>[^/]+)"
    s.add("data-versions", "GET", data + r"/versions", lambda r, m: _list_versions(fake, r, m))
    s.add(
        "data-version",
        "GET",
        data + r"/versions/(?P<v>[^/]+)",
        lambda r, m: get_child(fake, r, m, "data version"),
    )
    s.add("data-version", "PUT", data + r"/versions/(?P<v>[^/]+)", lambda r, m: _put_data(fake, r, m))
    s.add("data-container", "GET", data, lambda r, m: get_child(fake, r, m, "data container"))
    connection = WS + r"/connections/(?P<name>[^/]+)"
    s.add("connection", "PUT", connection, lambda r, m: _put_connection(fake, r, m))
    s.add("connection", "GET", connection, lambda r, m: get_child(fake, r, m, "connection"))
    s.add("connection", "DELETE", connection, lambda r, m: _delete_connection(fake, r, m))
    s.add(
        "connection-secrets", "POST", connection + r"/listsecrets", lambda r, m: _connection_secrets(fake, m)
    )


# datastores and data assets --------------------------------------------------------------------
def _list_datastores(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    found = fake.store.children(ws["id"], "datastores")
    if req.query.get("isDefault") == "true":
        found = [d for d in found if d["properties"].get("isDefault")]
    return Response(200, {"value": found})


def _secrets(fake: FakeAzure, m: re.Match) -> Response:
    ws = workspace(fake, m)
    fake.store.get(f"{ws['id']}/datastores/{m['name']}", "datastore")
    return Response(200, {"secretsType": "AccountKey", "key": fake.blob.key if fake.blob else "fake"})


def _list_versions(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    return asset_versions(fake, req, f"{workspace(fake, m)['id']}/data/{m['name']}")


def _put_data(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    rid = f"{ws['id']}/data/{m['name']}/versions/{m['v']}"
    new_asset_version(fake, rid, "Data")
    props = req.json().get("properties") or {}
    uri = props.get("dataUri") or ""
    if not uri.startswith(("azureml://", "https://", "http://")):
        raise ArmError(400, "UserError", f"dataUri '{uri}' is not a datastore or storage URI")
    container = f"{ws['id']}/data/{m['name']}"
    if fake.store.find(container) is None:
        fake.store.put(
            container,
            arm_body(
                container,
                "Microsoft.MachineLearningServices/workspaces/data",
                {},
                properties={"dataType": props.get("dataType")},
            ),
        )
    body = arm_body(
        rid,
        "Microsoft.MachineLearningServices/workspaces/data/versions",
        {},
        properties={**props, "isArchived": False, "isAnonymous": False, "provisioningState": "Succeeded"},
        systemData={"createdAt": now_iso(), "createdBy": fake.app.client_id},
    )
    fake.store.put(rid, body)
    return Response(201, body)


# workspace connections (Prompt flow's custom connection) ----------------------------------------
CONNECTION_CATEGORIES = {"CustomKeys", "ApiKey", "AzureOpenAI", "CognitiveSearch", "Serverless"}


def _put_connection(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    props = req.json().get("properties") or {}
    if props.get("category") not in CONNECTION_CATEGORIES:
        raise ArmError(400, "BadArgument", f"connection category '{props.get('category')}' is not valid")
    if props.get("category") == "CustomKeys":
        keys = (props.get("credentials") or {}).get("keys")
        if props.get("authType") != "CustomKeys" or not isinstance(keys, dict) or not keys:
            raise ArmError(
                400, "BadArgument", "a CustomKeys connection needs authType CustomKeys and credentials.keys"
            )
    rid = f"{ws['id']}/connections/{m['name']}"
    existing = fake.store.find(rid)
    fake.connection_secrets[rid.lower()] = dict((props.get("credentials") or {}).get("keys") or {})
    public = {k: v for k, v in props.items() if k != "credentials"}  # Azure never returns the secrets
    body = arm_body(rid, "Microsoft.MachineLearningServices/workspaces/connections", {}, properties=public)
    fake.store.put(rid, body)
    return Response(200 if existing else 201, body)


def _delete_connection(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    rid = f"{ws['id']}/connections/{m['name']}"
    if fake.store.find(rid) is None:
        return Response(204)
    fake.store.remove(rid)
    fake.connection_secrets.pop(rid.lower(), None)
    return Response(200)


def _connection_secrets(fake: FakeAzure, m: re.Match) -> Response:
    ws = workspace(fake, m)
    connection = fake.store.get(f"{ws['id']}/connections/{m['name']}", "connection")
    keys = fake.connection_secrets.get(connection["id"].lower(), {})
    return Response(
        200, {**connection, "properties": {**connection["properties"], "credentials": {"keys": keys}}}
    )
