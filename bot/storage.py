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
import copy
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


# The e-tag of an item read as absent: writing it back creates the item only if it is still absent
# (two first turns of one conversation must not both win).
ABSENT = "absent"


class MemoryStore(MemoryStorage):
    """botbuilder's MemoryStorage with the blob store's e-tags, plus ``claim``; atomic because nothing
    in it awaits.

    Every write gives the item a new e-tag (botbuilder's gives none to an item first written without
    one, so there the last write silently wins), reads return copies (botbuilder's return the stored
    dicts, so a turn's changes would land before it saves), and a write carrying an e-tag that is no
    longer the stored one is refused with ``StorageConflictError``, as the blob store does.

    Claims live apart from the items, oldest first, and are forgotten once stale, so a long-running
    local host does not keep every activity id it ever saw.
    """

    def __init__(self, dictionary: dict | None = None) -> None:
        super().__init__(dictionary)
        self.claims: OrderedDict[str, float] = OrderedDict()

    async def read(self, keys: list[str]) -> dict[str, Any]:
        return {key: copy.deepcopy(self.memory[key]) for key in keys if key in self.memory}

    async def write(self, changes: dict[str, Any]) -> None:
        if changes is None:
            raise ValueError("changes are required when writing")
        for key, change in changes.items():
            item = copy.deepcopy(_as_dict(change, key))
            etag = item.pop("e_tag", None)
            stored = self.memory.get(key)
            if etag == ABSENT:
                stale = stored is not None
            elif etag in (None, "*"):
                stale = False  # an unconditional write
            else:
                stale = stored is None or stored.get("e_tag") != etag
            if stale:
                raise StorageConflictError(_conflict(key))
            self._e_tag += 1
            item["e_tag"] = str(self._e_tag)
            self.memory[key] = item
            _note_etag(change, item["e_tag"])

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


def _conflict(key: str) -> str:
    return f"state {key!r} was changed by another turn since it was read; retry the turn"


def _note_etag(change: Any, etag: str) -> None:
    """The written item's new e-tag, back into the caller's item: a second save in the same turn then
    carries the e-tag it wrote, not the one it read (which would conflict with itself)."""
    if isinstance(change, dict):
        change["e_tag"] = etag
    elif hasattr(change, "e_tag"):
        change.e_tag = etag


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
            conditions: dict[str, Any] = {"overwrite": True}
            if etag == ABSENT:
                conditions = {"overwrite": False}
            elif etag and etag != "*":
                conditions["etag"], conditions["match_condition"] = etag, MatchConditions.IfNotModified
            try:
                blob = client.get_blob_client(blob_name(key))
                written = await blob.upload_blob(json.dumps(item), **conditions)  # its properties
            except (ResourceModifiedError, ResourceExistsError):
                raise StorageConflictError(_conflict(key)) from None
            _note_etag(change, written["etag"])

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
