"""Access tokens of the emulated Entra ID: compact HS256 JWTs signed with a per-run random key.

Every emulated API verifies the bearer token it gets (signature, expiry, audience) with :class:`TokenIssuer`, so a
client that asks for the wrong scope or reuses an expired token fails here exactly as it would against Azure.
Claims: ``tid`` (tenant), ``aud`` (resource), ``sub``/``oid`` (service principal or managed identity object ID),
``appid``/``azp`` (client ID), ``iss``, ``iat``, ``nbf``, ``exp``, ``ver``, ``idtyp`` and optionally ``roles``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

CLOCK_SKEW_SECONDS = 5


class TokenError(Exception):
    """A token was missing, malformed, badly signed, expired or for another audience. ``code`` is machine-readable
    (``missing``, ``malformed``, ``signature``, ``expired``, ``not_yet_valid``, ``audience``)."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (JWT encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url_encode`; raises ``ValueError`` on bad input."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("bad base64url") from exc


def split_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """``(header, claims, signing_input, signature)`` of a compact JWS, without verifying anything.

    Raises :class:`TokenError` (code ``malformed``) when it is not a three-part JWT with JSON header and claims.
    """
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise TokenError("the token is not a JWT (expected three dot-separated parts)", "malformed")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except ValueError as exc:
        raise TokenError("the token is not a valid JWT", "malformed") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("the token is not a valid JWT", "malformed")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def normalize_audience(value: str) -> str:
    """Audience comparison form: no trailing slash, case-insensitive (as Entra treats resource URIs)."""
    return value.strip().rstrip("/").lower()


def scope_to_resource(scope: str) -> str:
    """``https://graph.example/.default`` -> ``https://graph.example``; a bare resource is returned unchanged."""
    scope = scope.strip()
    if scope.endswith("/.default"):
        return scope[: -len("/.default")]
    if scope.endswith(".default"):
        return scope[: -len(".default")].rstrip("/")
    return scope


class TokenIssuer:
    """Issues and verifies the emulator's HS256 access tokens.

    ``issuer_base`` is the authority host written into ``iss`` (``{issuer_base}/{tid}/v2.0``); the hub sets it to the
    Entra emulator's URL once that is bound. ``clock`` returns seconds since the epoch (injectable for tests).
    """

    def __init__(self, key: bytes | None = None, issuer_base: str = "https://login.microsoftonline.com",
                 clock: Callable[[], float] = time.time) -> None:
        self._key = key or secrets.token_bytes(32)
        self.issuer_base = issuer_base.rstrip("/")
        self._clock = clock

    def issue(self, tenant_id: str, audience: str, subject: str, app_id: str, lifetime: int = 3600,
              extra_claims: Mapping[str, Any] | None = None) -> str:
        """A signed access token for ``audience`` valid ``lifetime`` seconds from now."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": f"{self.issuer_base}/{tenant_id}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "tid": tenant_id,
            "sub": subject,
            "oid": subject,
            "appid": app_id,
            "azp": app_id,
            "idtyp": "app",
            "ver": "2.0",
            "uti": uuid.uuid4().hex[:22],
        }
        if extra_claims:
            claims.update(extra_claims)
        header = {"alg": "HS256", "typ": "JWT", "kid": "emulator"}
        signing_input = (b64url_encode(json.dumps(header, separators=(",", ":")).encode())
                         + "." + b64url_encode(json.dumps(claims, separators=(",", ":")).encode()))
        signature = hmac.new(self._key, signing_input.encode("ascii"), hashlib.sha256).digest()
        return signing_input + "." + b64url_encode(signature)

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        """Claims of ``token`` after checking its signature, ``nbf``/``exp`` and that ``aud`` is ``audience`` (with or
        without a trailing slash). Raises :class:`TokenError`."""
        header, claims, signing_input, signature = split_jwt(token)
        if header.get("alg") != "HS256":
            raise TokenError("the token was not issued by this emulator (unexpected alg)", "signature")
        expected = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise TokenError("the token signature is invalid", "signature")
        now = self._clock()
        try:
            exp = float(claims["exp"])
            nbf = float(claims.get("nbf", claims.get("iat", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise TokenError("the token has no valid exp claim", "malformed") from exc
        if exp <= now:
            raise TokenError("Lifetime validation failed, the token is expired.", "expired")
        if nbf > now + CLOCK_SKEW_SECONDS:
            raise TokenError("Lifetime validation failed, the token is not yet valid.", "not_yet_valid")
        aud = claims.get("aud")
        if not isinstance(aud, str) or normalize_audience(aud) != normalize_audience(audience):
            raise TokenError(f"Invalid audience: the token is for {aud!r}, this API expects {audience!r}.",
                             "audience")
        return claims

    def verify_bearer(self, headers: Mapping[str, str], audience: str) -> dict[str, Any]:
        """Verify the ``authorization: Bearer <token>`` header (names lower-cased) for ``audience``."""
        value = headers.get("authorization")
        if not value:
            raise TokenError("Authorization header is missing.", "missing")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError("Authorization header is not a Bearer token.", "malformed")
        return self.verify(token.strip(), audience)
