"""Entra ID token issuance and the cloud discovery documents, at the HTTP level.

The app builds ``DefaultAzureCredential`` exactly as in production. With ``AZURE_TENANT_ID``,
``AZURE_CLIENT_ID`` and ``AZURE_CLIENT_SECRET`` set, its ``EnvironmentCredential`` runs MSAL's
client-credentials flow against the authority named by the cloud metadata (this server): OpenID
discovery, then ``POST /{tenant}/oauth2/v2.0/token``. Only tokens issued here open the ARM routes.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from .certs import STORAGE_SUFFIX
from .server import ArmError, Request, Response

if TYPE_CHECKING:
    from .azure import FakeAzure


@dataclass(frozen=True)
class AppRegistration:
    tenant_id: str = "7f1e2d3c-0000-4000-8000-00000000aa01"
    client_id: str = "5b6c7d8e-0000-4000-8000-00000000cc01"
    client_secret: str = "fake-client-secret-for-tests"
    object_id: str = "9a8b7c6d-0000-4000-8000-00000000ee01"  # the service principal's object id


CLOUD_PREFIX = "FakeAzureCloud"  # + the port: azure-ai-ml caches clouds by name for the whole process


def register(fake: FakeAzure) -> None:
    s = fake.server
    s.add("cloud-metadata", "GET", r"/metadata/endpoints", lambda r, m: _metadata(fake), auth="none")
    s.add(
        "openid-configuration",
        "GET",
        r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration",
        lambda r, m: _openid(fake, m["tenant"]),
        auth="none",
    )
    s.add(
        "token",
        "POST",
        r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token",
        lambda r, m: _token(fake, r, m["tenant"]),
        auth="none",
    )


def _metadata(fake: FakeAzure) -> Response:
    url = fake.server.url
    return Response(
        200,
        [
            {
                "name": f"{CLOUD_PREFIX}{url.rsplit(':', 1)[-1]}",
                "portal": "https://portal.fake.azure.test",
                "resourceManager": f"{url}/",
                "authentication": {
                    "loginEndpoint": f"{url}/",
                    "audiences": [f"{url}/"],
                    "tenant": "common",
                    "identityProvider": "AAD",
                },
                "suffixes": {"storage": STORAGE_SUFFIX, "acrLoginServer": "fake.azurecr.test"},
            }
        ],
    )


def _openid(fake: FakeAzure, tenant: str) -> Response:
    if tenant != fake.app.tenant_id:
        raise ArmError(400, "invalid_tenant", f"AADSTS90002: Tenant '{tenant}' not found.")
    base = f"{fake.server.url}/{tenant}"
    return Response(
        200,
        {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "tenant_region_scope": "NA",
        },
    )


def _token(fake: FakeAzure, req: Request, tenant: str) -> Response:
    form = dict(parse_qsl(req.raw.decode()))
    app = fake.app
    if form.get("grant_type") != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "only client_credentials is served by the fake")
    if tenant != app.tenant_id:
        return _oauth_error(400, "invalid_request", f"AADSTS90002: Tenant '{tenant}' not found.")
    if form.get("client_id") != app.client_id or form.get("client_secret") != app.client_secret:
        return _oauth_error(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
    scope = form.get("scope", "")
    if not re.fullmatch(r"\S+/\.default", scope):
        return _oauth_error(400, "invalid_scope", f"AADSTS70011: The provided scope '{scope}' is not valid.")
    audience = scope[: -len("/.default")]
    token = _jwt(
        {
            "aud": audience,
            "iss": f"{fake.server.url}/{tenant}/v2.0",
            "iat": int(time.time()),
            "nbf": int(time.time()),
            "exp": int(time.time()) + 3599,
            "tid": tenant,
            "oid": app.object_id,
            "sub": app.object_id,
            "appid": app.client_id,
            "idtyp": "app",
        }
    )
    fake.server.tokens[token] = {
        "scope": scope,
        "aud": audience,
        "client_id": app.client_id,
        "tenant": tenant,
    }
    return Response(
        200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}
    )


def _jwt(claims: dict) -> str:
    """A JWT-shaped token (the SDK reads its claims without verifying them); the fake checks it by lookup."""

    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'typ': 'JWT', 'kid': 'fake'})}.{part(claims)}.{signature}"


def _oauth_error(status: int, code: str, description: str) -> Response:
    return Response(status, {"error": code, "error_description": description, "error_codes": [0]})
