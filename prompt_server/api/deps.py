"""Dependencies shared by the routes: the service handle and the two bearer-key checks."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from prompt_server.api.errors import UNAUTHORIZED, ApiError
from prompt_server.api.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _matches(token: str, keys: list[str]) -> bool:
    """Whether `token` is one of `keys`, in constant time: hmac.compare_digest on SHA-256 digests (equal lengths, so
    the time tells nothing of a key's length either), and every key compared, so it tells nothing of which matched."""
    given = _digest(token)
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, _digest(key))
    return matched


def _check(request: Request, keys: list[str], what: str) -> None:
    if not keys:
        return
    token = _bearer(request)
    if not token:  # no header, another scheme, or `Bearer` with nothing after it: never a match, even for a key ""
        raise ApiError(401, f"missing {what}: send 'Authorization: Bearer <key>'", UNAUTHORIZED,
                       headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, keys):
        raise ApiError(401, f"invalid {what}", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request, service: ServiceDep) -> None:
    """Every route but /health: the API key (or the admin key) when an API key is configured."""
    s = service.settings
    if s.api_key is not None:
        _check(request, [k for k in (s.api_key, s.admin_key) if k is not None], "API key")


def require_admin_key(request: Request, service: ServiceDep) -> None:
    """Adapter writes: the admin key when one is configured, otherwise the API key rules."""
    s = service.settings
    if s.admin_key is not None:
        _check(request, [s.admin_key], "admin key")
    elif s.api_key is not None:
        _check(request, [s.api_key], "API key")


def require_generation(service: ServiceDep) -> None:
    """Generation routes on a model that does not generate (an encoder classifier) answer 400 naming its family,
    before the body is validated."""
    service.check_generates()
