"""Where conversation state, pending answers and seen activity ids live.

``MemoryStore`` for one process (local runs, tests); ``BlobStore`` for Azure, where several
instances share the state: a botbuilder ``Storage`` over the current azure-storage-blob (async),
one JSON blob per key, e-tags for optimistic concurrency. (botbuilder-azure's BlobStorage pins
azure-storage-blob 12.7.0, which cannot live beside azure-ai-ml.)

Both add ``claim(key, value, stale_after_s)``: write ``value`` only if the key is absent or its
claim is stale; True when this caller won. The blob version is atomic across instances.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import weakref
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from botbuilder.core import MemoryStorage, Storage

MAX_BLOB_NAME = 1024


class StorageConflictError(Exception):
    """Someone else changed the item since it was read (e-tag mismatch)."""


class MemoryStore(MemoryStorage):
    """botbuilder's MemoryStorage plus ``claim``; atomic because nothing in it awaits.

    Claims live apart from the items, oldest first, and are forgotten once stale, so a long-running
    local host does not keep every activity id it ever saw.
    """

    def __init__(self, dictionary: dict | None = None) -> None:
        super().__init__(dictionary)
        self.claims: OrderedDict[str, float] = OrderedDict()

    async def claim(self, key: str, value: dict[str, Any], stale_after_s: float) -> bool:
        now = time.time()
        while self.claims and now - next(iter(self.claims.values())) >= stale_after_s:
            self.claims.popitem(last=False)
        if key in self.claims and now - self.claims[key] < stale_after_s:
            return False
        self.claims.pop(key, None)
        self.claims[key] = now
        return True


def blob_name(key: str) -> str:
    """A blob name for a storage key (Teams conversation ids carry ':', ';' and '@')."""
    name = quote(key, safe="") + ".json"
    if len(name) > MAX_BLOB_NAME:
        name = "sha256-" + hashlib.sha256(key.encode()).hexdigest() + ".json"
    return name


def _as_dict(item: Any, key: str) -> dict[str, Any]:
    if isinstance(item, dict):
        return dict(item)
    if hasattr(item, "__dict__"):
        return dict(vars(item))
    raise TypeError(f"storage item for key {key!r} must be a dict or an object, not {type(item).__name__}")


class BlobStore(Storage):
    """A ``Storage`` over one blob container (created on first use)."""

    def __init__(
        self,
        container: str,
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
    ) -> None:
        if not connection_string and not account_url:
            raise ValueError(
                "the blob state store needs BOT_STATE_CONNECTION_STRING (or AzureWebJobsStorage) or "
                "BOT_STATE_ACCOUNT_URL with an identity that has 'Storage Blob Data Contributor'"
            )
        self.container = container
        self._connection_string = connection_string
        self._account_url = account_url
        self._credential = credential
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    async def _client(self):
        from azure.storage.blob.aio import BlobServiceClient

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            if self._connection_string:
                service = BlobServiceClient.from_connection_string(self._connection_string)
            else:
                service = BlobServiceClient(self._account_url, credential=self._credential)
            client = service.get_container_client(self.container)
            try:
                await client.create_container()
            except ResourceExistsError:
                pass  # the normal case after the first start
            self._clients[loop] = client
        return client

    async def close(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def read(self, keys: list[str]) -> dict[str, Any]:
        client = await self._client()
        items: dict[str, Any] = {}
        for key in keys:
            try:
                downloader = await client.download_blob(blob_name(key))
            except ResourceNotFoundError:
                continue
            item = json.loads(await downloader.readall())
            item["e_tag"] = downloader.properties.etag
            items[key] = item
        return items

    async def write(self, changes: dict[str, Any]) -> None:
        client = await self._client()
        for key, change in changes.items():
            item = _as_dict(change, key)
            etag = item.pop("e_tag", None)
            conditions: dict[str, Any] = {}
            if etag and etag != "*":
                conditions = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
            try:
                await client.upload_blob(blob_name(key), json.dumps(item), overwrite=True, **conditions)
            except ResourceModifiedError:
                raise StorageConflictError(
                    f"state {key!r} was changed by another turn since it was read; retry the turn"
                ) from None

    async def delete(self, keys: list[str]) -> None:
        client = await self._client()
        for key in keys:
            try:
                await client.delete_blob(blob_name(key))
            except ResourceNotFoundError:
                continue

    async def claim(self, key: str, value: dict[str, Any], stale_after_s: float) -> bool:
        client = await self._client()
        body = json.dumps({**value, "claimed_at": time.time()})
        try:
            await client.upload_blob(blob_name(key), body, overwrite=False)
            return True
        except ResourceExistsError:
            pass
        held = (await self.read([key])).get(key)
        if held is None or time.time() - float(held.get("claimed_at", 0)) < stale_after_s:
            return False
        try:  # a stale claim: take it over unless another instance just did
            await client.upload_blob(
                blob_name(key),
                body,
                overwrite=True,
                etag=held["e_tag"],
                match_condition=MatchConditions.IfNotModified,
            )
        except ResourceModifiedError:
            return False
        return True
