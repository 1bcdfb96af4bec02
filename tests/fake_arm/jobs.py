"""Azure ML jobs: the fine-tuning pipeline (registry component on a cluster) and serverless fine-tuning.

Rules enforced: a job name is taken once (a second PUT is 409); a pipeline node may only pass
inputs its component declares and must name an existing, provisioned cluster; data inputs must be
registered assets; a serverless fine-tune needs validation data and a workspace in a region where
the model offers it (East US 2 for Phi-3). Status moves one step per read of the job, through
NotStarted, Queued, Preparing, Running, Finalizing to Completed (``FakeAzureConfig.job_statuses``).
A completed serverless fine-tune registers its output model, as Azure does.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .registry import BASE_MODEL, COMPONENT_INPUTS, base_model_asset_id, component_asset_id
from .server import ArmError, Request, Response, not_found
from .store import arm_body, now_iso
from .workspace import WS, asset_versions, new_asset_version, workspace

if TYPE_CHECKING:
    from .azure import FakeAzure

SERVERLESS_REGIONS = ("eastus2",)


def register(fake: FakeAzure) -> None:
    s = fake.server
    job = WS + r"/jobs/(?P<name>[^/]+)"
    s.add("job", "GET", job, lambda r, m: _get_job(fake, r, m))
    s.add("job", "PUT", job, lambda r, m: _put_job(fake, r, m))
    s.add("job-cancel", "POST", job + r"/cancel", lambda r, m: _cancel(fake, r, m))
    model = WS + r"/models/(?P<name>[^/]+)"
    s.add("model-version", "GET", model + r"/versions/(?P<v>[^/]+)", lambda r, m: _get_model(fake, r, m))
    s.add("model-version", "PUT", model + r"/versions/(?P<v>[^/]+)", lambda r, m: _put_model(fake, r, m))
    s.add(
        "model-version", "DELETE", model + r"/versions/(?P<v>[^/]+)", lambda r, m: _delete_model(fake, r, m)
    )
    s.add("model-versions", "GET", model + r"/versions", lambda r, m: _list_models(fake, r, m))
    s.add("model-container", "GET", model, lambda r, m: _get_model_container(fake, r, m))


def _job_id(ws: dict, name: str) -> str:
    return f"{ws['id']}/jobs/{name}"


def _get_job(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    job = fake.store.get(_job_id(ws, m["name"]), "job")
    _advance(fake, ws, job)
    return Response(200, job)


def _advance(fake: FakeAzure, ws: dict, job: dict) -> None:
    """One step along ``job_statuses`` per read (a status may repeat there, to make a job run longer)."""
    props = job["properties"]
    statuses = fake.config.job_statuses
    if props["status"] == "CancelRequested":
        props["status"] = "Canceled"
        return
    if props["status"] in ("Canceled", "Failed", "Completed"):
        return
    step = min(fake.job_progress.get(job["id"], 0) + 1, len(statuses) - 1)
    fake.job_progress[job["id"]] = step
    props["status"] = statuses[step]
    if props["status"] == "Completed":
        _complete(fake, ws, job)


def _complete(fake: FakeAzure, ws: dict, job: dict) -> None:
    props = job["properties"]
    props.setdefault("properties", {})["completedAt"] = now_iso()
    fake.record(f"job {job['name']} completed")
    if props.get("jobType") != "FineTuning":
        return
    output = (props.get("outputs") or {}).get("registered_model") or {}
    name = output.get("assetName")
    rid = f"{ws['id']}/models/{name}/versions/1"
    fake.store.put(
        rid,
        arm_body(
            rid,
            "Microsoft.MachineLearningServices/workspaces/models/versions",
            {},
            properties={
                "modelType": "mlflow_model",
                "modelUri": f"azureml://jobs/{job['name']}/outputs/registered_model",
                "flavors": {"transformers": {}},
                "jobName": job["name"],
                "tags": {},
                "properties": {},
                "isArchived": False,
                "provisioningState": "Succeeded",
            },
            systemData={"createdAt": now_iso(), "createdBy": "Azure AI Foundry fine-tuning"},
        ),
    )


def _put_job(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    rid = _job_id(ws, m["name"])
    if fake.store.find(rid) is not None:
        raise ArmError(409, "UserError", f"A job with name '{m['name']}' already exists in this workspace.")
    props = dict(req.json().get("properties") or {})
    kind = props.get("jobType")
    if kind == "Pipeline":
        _validate_pipeline(fake, ws, props)
    elif kind == "FineTuning":
        _validate_finetuning(fake, ws, props)
    else:
        raise ArmError(400, "UserError", f"the fake runs Pipeline and FineTuning jobs, not {kind}")
    studio = f"https://ml.azure.test/runs/{m['name']}?wsid={ws['id']}"
    props.update(status="NotStarted", services={"Studio": {"jobServiceType": "Studio", "endpoint": studio}})
    job = arm_body(
        rid,
        "Microsoft.MachineLearningServices/workspaces/jobs",
        {},
        properties=props,
        systemData={"createdAt": now_iso(), "createdBy": fake.app.client_id},
    )
    fake.store.put(rid, job)
    return Response(201, job)


def _data_exists(fake: FakeAzure, ws: dict, uri: str) -> bool:
    found = re.search(r"/data/([^/]+)/versions/([^/]+)$", uri) or re.fullmatch(r"azureml:([^:]+):(\d+)", uri)
    return bool(found and fake.store.find(f"{ws['id']}/data/{found.group(1)}/versions/{found.group(2)}"))


def _validate_pipeline(fake: FakeAzure, ws: dict, props: dict) -> None:
    nodes = props.get("jobs") or {}
    if not nodes:
        raise ArmError(400, "UserError", "a pipeline job needs at least one node")
    for node_name, node in nodes.items():
        if (node.get("componentId") or "") != component_asset_id():
            raise ArmError(400, "UserError", f"node {node_name}: unknown component {node.get('componentId')}")
        inputs = node.get("inputs") or {}
        undeclared = sorted(set(inputs) - set(COMPONENT_INPUTS))
        if undeclared:
            raise ArmError(
                400,
                "UserError",
                f"node {node_name}: inputs {undeclared} are not declared by chat_completion_pipeline",
            )
        for key, spec in COMPONENT_INPUTS.items():
            if not spec.get("optional") and key not in inputs and spec.get("default") is None:
                raise ArmError(400, "UserError", f"node {node_name}: required input {key} is missing")
        for key in (
            "compute_model_import",
            "compute_preprocess",
            "compute_finetune",
            "compute_model_evaluation",
        ):
            cluster = (inputs.get(key) or {}).get("value")
            if cluster and cluster != "serverless":
                found = fake.store.find(f"{ws['id']}/computes/{cluster}")
                if found is None or found["properties"]["provisioningState"] != "Succeeded":
                    raise ArmError(
                        400,
                        "UserError",
                        f"node {node_name}: compute '{cluster}' ({key}) is not a provisioned cluster",
                    )
        for key in ("train_file_path", "validation_file_path"):
            uri = (inputs.get(key) or {}).get("uri") or ""
            if uri and not _data_exists(fake, ws, uri):
                raise ArmError(
                    400, "UserError", f"node {node_name}: {key} '{uri}' is not a registered data asset"
                )
        model = (inputs.get("mlflow_model_path") or {}).get("uri") or ""
        if not model.startswith(f"azureml://registries/azureml/models/{BASE_MODEL}/versions/"):
            raise ArmError(
                400, "UserError", f"node {node_name}: mlflow_model_path '{model}' is not a catalog model"
            )


def _validate_finetuning(fake: FakeAzure, ws: dict, props: dict) -> None:
    details = props.get("fineTuningDetails") or {}
    model = (details.get("model") or {}).get("uri") or ""
    if model != base_model_asset_id():
        raise ArmError(
            400, "UserError", f"fine-tuning model '{model}' is not the catalog's latest {BASE_MODEL}"
        )
    for key in ("trainingData", "validationData"):
        uri = (details.get(key) or {}).get("uri") or ""
        if not _data_exists(fake, ws, uri):
            raise ArmError(400, "UserError", f"{key} '{uri}' is not a registered data asset")
    if not props.get("computeId") and ws["location"] not in SERVERLESS_REGIONS:
        raise ArmError(
            400,
            "UserError",
            f"Serverless fine-tuning of {BASE_MODEL} is not available in region '{ws['location']}'; "
            "supported: eastus2",
        )
    output = (props.get("outputs") or {}).get("registered_model") or {}
    if not output.get("assetName"):
        raise ArmError(
            400, "UserError", "a fine-tuning job needs an output registered_model with an assetName"
        )


def _cancel(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    job = fake.store.get(_job_id(ws, m["name"]), "job")
    if job["properties"]["status"] not in ("Completed", "Failed", "Canceled"):
        job["properties"]["status"] = "CancelRequested"
    op = fake.store.start(job["id"], "action", 0, lambda: None)
    return fake.accepted(op, 202, None, api_version=req.api_version)


# models --------------------------------------------------------------------------------------------
def _get_model(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    return Response(200, fake.store.get(f"{ws['id']}/models/{m['name']}/versions/{m['v']}", "model version"))


def _delete_model(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    """Refused (409) while a deployment or serverless endpoint of the workspace uses the version."""
    ws = workspace(fake, m)
    rid = f"{ws['id']}/models/{m['name']}/versions/{m['v']}"
    if fake.store.find(rid) is None:
        return Response(204)
    suffix = f"/models/{m['name']}/versions/{m['v']}".lower()
    users = [
        d["id"]
        for d in fake.store.by_type(
            "Microsoft.MachineLearningServices/workspaces/onlineEndpoints/deployments"
        )
        if str(d["properties"].get("model", "")).lower().endswith(suffix)
    ] + [
        e["id"]
        for e in fake.store.by_type("Microsoft.MachineLearningServices/workspaces/serverlessEndpoints")
        if str((e["properties"].get("modelSettings") or {}).get("modelId", "")).lower().endswith(suffix)
    ]
    if users:
        raise ArmError(
            409, "Conflict", f"model version {m['name']}:{m['v']} is in use by {users[0].rsplit('/', 3)[-3]}"
        )
    fake.store.remove(rid)
    fake.record(f"model {m['name']}:{m['v']} deleted")
    return Response(200)


def _get_model_container(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    versions = fake.store.children(f"{ws['id']}/models/{m['name']}", "versions")
    if not versions:
        raise not_found("model", m["name"])
    rid = f"{ws['id']}/models/{m['name']}"
    return Response(
        200,
        arm_body(
            rid,
            "Microsoft.MachineLearningServices/workspaces/models",
            {},
            properties={"latestVersion": str(len(versions))},
        ),
    )


def _list_models(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    return asset_versions(fake, req, f"{workspace(fake, m)['id']}/models/{m['name']}")


def _put_model(fake: FakeAzure, req: Request, m: re.Match) -> Response:
    ws = workspace(fake, m)
    rid = f"{ws['id']}/models/{m['name']}/versions/{m['v']}"
    new_asset_version(fake, rid, "Model")
    props = req.json().get("properties") or {}
    uri = props.get("modelUri") or ""
    found = re.fullmatch(r"azureml://jobs/([^/]+)/outputs/([^/]+)", uri)
    if found:
        job = fake.store.find(_job_id(ws, found.group(1)))
        if job is None:
            raise ArmError(400, "UserError", f"modelUri {uri}: no job named {found.group(1)}")
        if job["properties"]["status"] != "Completed":
            raise ArmError(
                400,
                "UserError",
                f"modelUri {uri}: job {found.group(1)} is {job['properties']['status']}, not Completed",
            )
        if found.group(2) not in (job["properties"].get("outputs") or {}):
            raise ArmError(
                400, "UserError", f"modelUri {uri}: job {found.group(1)} has no output '{found.group(2)}'"
            )
    body = arm_body(
        rid,
        "Microsoft.MachineLearningServices/workspaces/models/versions",
        {},
        properties={
            **props,
            "flavors": props.get("flavors") or {"python_function": {}},
            "provisioningState": "Succeeded",
        },
        systemData={"createdAt": now_iso(), "createdBy": fake.app.client_id},
    )
    fake.store.put(rid, body)
    return Response(201, body)
