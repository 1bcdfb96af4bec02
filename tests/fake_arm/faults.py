"""Fault plans for the fake: what goes wrong, on which call."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from .server import Request

# Not faulted: azure-ai-ml reads the cloud metadata with a pipeline that has no retry policy at all
# (Azure's metadata endpoint is a static document), and the operation-status routes only serve the
# SDK's background pollers, which the app never waits on.
UNFAULTED_ROUTES = frozenset({"cloud-metadata", "operation-status", "operation-result", "unknown"})
SCORING_ROUTES = frozenset({"scoring", "serverless-chat"})
# Azure Storage never answers 429: it throttles with 503 ServerBusy (its SDKs do not retry a 429).
STORAGE_ROUTES = frozenset({"file-share"})


@dataclass
class FirstCallFails:
    """Every distinct call (method + route + path) fails once, in rotation through ``kinds``.

    ``429``/``503`` are answered before the request is processed (throttled, unavailable). ``stall``
    processes the request and then answers too late for the client's timeout — the request *did*
    happen, so the retry must be safe. azure-core does not retry a POST after a read timeout, so a
    POST gets ``503`` instead of a stall; the scoring hosts get ``503`` (the only answer the scoring
    client retries: the model certainly did not run).
    """

    kinds: tuple[str, ...] = ("429", "503", "stall", "503")  # a stall costs the client's whole timeout
    injected: list[tuple[str, str, str]] = field(default_factory=list)
    _seen: set[tuple[str, str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, req: Request, route: str) -> str | None:
        if route in UNFAULTED_ROUTES:
            return None
        key = (req.method, route, re.sub(r"/fakeoperations/[^/]+", "/fakeoperations/*", req.path.lower()))
        with self._lock:
            if key in self._seen:
                return None
            self._seen.add(key)
            kind = self.kinds[len(self.injected) % len(self.kinds)]
            never_stalled = kind == "stall" and req.method in ("POST", "PATCH")
            never_429 = kind == "429" and route in STORAGE_ROUTES
            if route in SCORING_ROUTES or never_stalled or never_429:
                kind = "503"
            self.injected.append((req.method, route, kind))
            return kind
