"""Step 2 of the tutorial: the train/validation JSONL files as Azure ML data assets.

Data asset versions are immutable. The blob path is derived from the file's SHA-256, so a retried
upload writes the same bytes to the same place; the asset version that carries that hash in its
tags is reused, and only new content gets a new version. The bytes go to the workspace's default
datastore with azure-storage-blob (its account key comes from the datastore, as the Azure ML SDK
itself does it); the blob endpoint is the storage account's own, read from ARM, so any cloud works.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from backends.protocol import BackendError, DataAsset

from .clients import AzureClients
from .errors import azure_errors
from .setup import MANAGED_BY_TAG, read_workspace

log = logging.getLogger(__name__)

DATA_PREFIX = "phi3-finetune"
STORAGE_API = "2023-05-01"


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _existing_versions(clients: AzureClients, name: str) -> list:
    with azure_errors(f"list versions of data asset '{name}'"):
        try:
            return list(clients.ml.data.list(name=name))
        except ResourceNotFoundError:
            return []


def _asset(data, digest: str) -> DataAsset:
    return DataAsset(
        name=data.name, version=str(data.version), uri=f"azureml:{data.name}:{data.version}", sha256=digest
    )


def _blob_endpoint(clients: AzureClients) -> str:
    workspace = read_workspace(clients)
    if workspace is None or not workspace.storage_account:
        raise BackendError(
            f"workspace '{clients.target.workspace}' has no storage account; run the workspace step first"
        )
    with azure_errors("read the workspace storage account"):
        account = clients.resources.resources.get_by_id(workspace.storage_account, api_version=STORAGE_API)
    endpoint = ((account.properties or {}).get("primaryEndpoints") or {}).get("blob")
    if not endpoint:
        raise BackendError(f"storage account {workspace.storage_account} reports no blob endpoint")
    return endpoint.rstrip("/")


def upload_file(clients: AzureClients, source: Path, blob_path: str) -> str:
    """Upload to the default datastore; returns the ``azureml://datastores/...`` URI of the blob."""
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.storage.blob import BlobClient

    with azure_errors("read the workspace's default datastore"):
        store = clients.ml.datastores.get_default(include_secrets=True)
    key = getattr(store.credentials, "account_key", None)
    if not key:
        raise BackendError(
            f"datastore '{store.name}' uses identity-based access; give the app's identity Storage Blob Data "
            "Contributor on the workspace storage account, or restore the datastore's account key"
        )
    blob = BlobClient(
        _blob_endpoint(clients),
        store.container_name,
        blob_path,
        credential=AzureNamedKeyCredential(store.account_name, key),
        **clients.pipeline_options,
    )
    with azure_errors(f"upload {source.name} to datastore '{store.name}'"), source.open("rb") as f:
        blob.upload_blob(f, overwrite=True)
    return f"azureml://datastores/{store.name}/paths/{blob_path}"


def ensure_data_asset(clients: AzureClients, name: str, source: Path) -> DataAsset:
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Data

    digest = sha256(source)
    versions = _existing_versions(clients, name)
    for data in versions:
        if (data.tags or {}).get("sha256") == digest:
            return _asset(data, digest)  # same content: reuse, never a second version
    uri = upload_file(clients, source, f"{DATA_PREFIX}/{name}/{digest[:16]}/{source.name}")
    version = str(max((int(d.version) for d in versions if str(d.version).isdigit()), default=0) + 1)
    spec = Data(
        name=name,
        version=version,
        type=AssetTypes.URI_FILE,
        path=uri,
        description=f"{source.name} for Phi-3 fine-tuning",
        tags={**MANAGED_BY_TAG, "sha256": digest},
    )
    with azure_errors(f"register data asset {name}:{version}"):
        try:
            created = clients.ml.data.create_or_update(spec)
        except ResourceExistsError:
            # The PUT reached Azure but its answer was lost: that version is ours if it has our hash.
            created = clients.ml.data.get(name, version=version)
            if (created.tags or {}).get("sha256") != digest:
                raise BackendError(
                    f"data asset {name}:{version} was registered meanwhile with other content; retry the run"
                ) from None
    return _asset(created, digest)
