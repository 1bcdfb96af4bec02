"""Azure Files for the workspaces' ``workspaceworkingdirectory`` share, where Prompt flow uploads flows.

Azurite serves blobs only, so the fake answers the File REST calls promptflow-azure makes through
azure-storage-file-share: create a directory, read a directory's properties, create a file and write
its ranges. Requests arrive at ``<account>.file.<storage suffix>`` through the fake's CONNECT proxy.

Rules enforced, as Azure Files does: Shared Key authorization signed with the storage account's key
(403 AuthenticationFailed otherwise); a directory or file needs its parent directory (404
ParentNotFound); creating an existing directory is 409 ResourceAlreadyExists; a range write must
fit the file, carry exactly its range's bytes, and match its Content-MD5 (400 otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .certs import STORAGE_SUFFIX
from .server import Request, Response
from .store import now_iso

if TYPE_CHECKING:
    from .azure import FakeAzure

FILE_HOST = rf"(?P<account>[a-z0-9]+)\.file\.{re.escape(STORAGE_SUFFIX)}"
SIGNED_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


@dataclass
class Share:
    """One file share: its directories (``""`` is the root) and files (path → bytes)."""

    account: str
    name: str
    directories: set[str] = field(default_factory=lambda: {""})
    files: dict[str, bytearray] = field(default_factory=dict)

    def tree(self, under: str = "") -> dict[str, bytes]:
        """Files under a directory, by path relative to it."""
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        return {p[len(prefix) :]: bytes(b) for p, b in self.files.items() if p.startswith(prefix)}


class StorageError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FileShares:
    """Every storage account's shares, and the accounts' keys (Shared Key checks against them)."""

    keys: dict[str, str] = field(default_factory=dict)  # account -> base64 key
    shares: dict[tuple[str, str], Share] = field(default_factory=dict)

    def create_share(self, account: str, name: str) -> Share:
        return self.shares.setdefault((account.lower(), name.lower()), Share(account, name))

    def share(self, account: str, name: str) -> Share | None:
        return self.shares.get((account.lower(), name.lower()))


def provision_working_directory(fake: FakeAzure, workspace_id: str, workspace_guid: str) -> None:
    """What Azure makes with every workspace: the ``workspaceworkingdirectory`` datastore and its share."""
    from .store import arm_body

    account = fake.blob.account if fake.blob else "fakestorage"
    fake.files.keys[account.lower()] = fake.blob.key if fake.blob else base64.b64encode(b"fake").decode()
    share = f"code-{workspace_guid}"
    fake.files.create_share(account, share)
    rid = f"{workspace_id}/datastores/workspaceworkingdirectory"
    properties = {
        "datastoreType": "AzureFile",
        "accountName": account,
        "fileShareName": share,
        "endpoint": STORAGE_SUFFIX,
        "protocol": "https",
        "isDefault": False,
        "credentials": {"credentialsType": "AccountKey"},
        "serviceDataAccessAuthIdentity": "None",
    }
    fake.store.put(
        rid,
        arm_body(rid, "Microsoft.MachineLearningServices/workspaces/datastores", {}, properties=properties),
    )


def register(fake: FakeAzure) -> None:
    s = fake.server
    path = r"/(?P<share>[a-z0-9][a-z0-9-]{2,62})(?P<path>(/[^/]+)*)/?"
    s.add("file-share", "PUT", path, lambda r, m: _serve(fake, r, m, _put), auth="custom", host=FILE_HOST)
    s.add("file-share", "GET", path, lambda r, m: _serve(fake, r, m, _get), auth="custom", host=FILE_HOST)


def _serve(fake: FakeAzure, req: Request, m: re.Match, action) -> Response:
    account = req.host.split(".", 1)[0].lower()
    try:
        _check_shared_key(fake.files, account, req)
        share = fake.files.share(account, m["share"])
        if share is None:
            raise StorageError(404, "ShareNotFound", f"The specified share {m['share']} does not exist.")
        return action(share, (m["path"] or "").strip("/"), req)
    except StorageError as exc:
        return _error(exc)


def _put(share: Share, path: str, req: Request) -> Response:
    if req.query.get("restype") == "directory":
        return _create_directory(share, path)
    if req.query.get("comp") == "range":
        return _write_range(share, path, req)
    if req.headers.get("x-ms-type") == "file":
        return _create_file(share, path, req)
    raise StorageError(400, "UnsupportedHttpVerb", f"PUT {req.target} is not served by the fake")


def _get(share: Share, path: str, req: Request) -> Response:
    if req.query.get("restype") == "directory":
        if path not in share.directories:
            raise StorageError(404, "ResourceNotFound", "The specified resource does not exist.")
        return Response(200, b"", _properties())
    if path in share.files:
        data = bytes(share.files[path])
        return Response(200, data, {**_properties(), "Content-Type": "application/octet-stream"})
    raise StorageError(404, "ResourceNotFound", "The specified resource does not exist.")


def _parent(share: Share, path: str) -> None:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent not in share.directories:
        raise StorageError(404, "ParentNotFound", "The specified parent path does not exist.")


def _create_directory(share: Share, path: str) -> Response:
    if path in share.directories:
        raise StorageError(409, "ResourceAlreadyExists", "The specified resource already exists.")
    _parent(share, path)
    share.directories.add(path)
    return Response(201, b"", _properties())


def _create_file(share: Share, path: str, req: Request) -> Response:
    _parent(share, path)
    if path in share.directories:
        raise StorageError(409, "ResourceTypeMismatch", f"{path} is a directory")
    size = int(req.headers.get("x-ms-content-length", "-1"))
    if size < 0:
        raise StorageError(400, "MissingRequiredHeader", "x-ms-content-length is required")
    share.files[path] = bytearray(size)
    return Response(201, b"", _properties())


def _write_range(share: Share, path: str, req: Request) -> Response:
    if path not in share.files:
        raise StorageError(404, "ResourceNotFound", "The specified resource does not exist.")
    found = re.fullmatch(r"bytes=(\d+)-(\d+)", req.headers.get("x-ms-range", ""))
    if not found or req.headers.get("x-ms-write") != "update":
        raise StorageError(400, "InvalidHeaderValue", "x-ms-range bytes=<start>-<end> with x-ms-write update")
    start, end = int(found[1]), int(found[2])
    data, content = share.files[path], req.raw
    if end >= len(data) or end - start + 1 != len(content):
        raise StorageError(416, "InvalidRange", f"range {start}-{end} does not fit the file or the body")
    md5 = req.headers.get("content-md5")
    if md5 and base64.b64decode(md5) != hashlib.md5(content).digest():
        raise StorageError(400, "Md5Mismatch", "The MD5 value specified in the request did not match.")
    data[start : end + 1] = content
    return Response(201, b"", {**_properties(), **({"Content-MD5": md5} if md5 else {})})


def _check_shared_key(files: FileShares, account: str, req: Request) -> None:
    """Azure Storage's Shared Key scheme (version 2015-02-21 and later), recomputed from the request."""
    key = files.keys.get(account)
    auth = req.headers.get("authorization", "")
    if key is None or not auth.startswith(f"SharedKey {account}:"):
        raise StorageError(
            403, "AuthenticationFailed", f"Server failed to authenticate the request ({account})"
        )
    headers = {n: v for n, v in req.headers.items() if v}
    if headers.get("content-length") == "0":
        headers.pop("content-length")
    x_ms = sorted((n, v) for n, v in headers.items() if n.startswith("x-ms-"))
    x_ms.sort(key=lambda nv: (nv[0].replace("-", ""), nv[0]))  # the service's collation ignores '-' first
    target = urlsplit(req.target)
    query = sorted(q.partition("=")[::2] for q in target.query.split("&") if q)
    text = (
        req.method
        + "\n"
        + "".join(headers.get(n, "") + "\n" for n in SIGNED_HEADERS)
        + "".join(f"{n}:{v}\n" for n, v in x_ms)
        + f"/{account}{target.path}"
        + "".join(f"\n{n.lower()}:{unquote(v)}" for n, v in query)
    )
    digest = hmac.new(base64.b64decode(key), text.encode("utf-8"), hashlib.sha256).digest()
    if not hmac.compare_digest(auth.split(":", 1)[1], base64.b64encode(digest).decode()):
        raise StorageError(
            403,
            "AuthenticationFailed",
            "The MAC signature found in the HTTP request is not the same as computed",
        )


def _properties() -> dict[str, str]:
    stamp = now_iso()
    return {
        "ETag": f'"0x{abs(hash(stamp)):X}"',
        "Last-Modified": "Mon, 23 Nov 2026 10:00:00 GMT",
        "x-ms-request-server-encrypted": "true",
        "x-ms-file-creation-time": stamp,
        "x-ms-file-last-write-time": stamp,
        "x-ms-file-change-time": stamp,
        "x-ms-file-attributes": "Directory",
        "x-ms-file-id": "13835128424026341376",
        "x-ms-file-parent-id": "0",
        "x-ms-version": "2025-05-05",
    }


def _error(exc: StorageError) -> Response:
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{exc.code}</Code><Message>{exc.message}</Message></Error>"
    ).encode()
    return Response(exc.status, body, {"x-ms-error-code": exc.code, "Content-Type": "application/xml"})
