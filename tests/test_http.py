"""BearerSession: what is retried, and what is not (a POST that appends must never be sent twice blindly)."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from azure.core.credentials import AccessToken

from sync.http import ApiError, BearerSession, RetryPolicy


class Token:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("t", 2**31)


class Scripted(requests.Session):
    """Answers from a script: an exception to raise or (status, headers)."""

    def __init__(self, script: list[Any]) -> None:
        super().__init__()
        self.script = script
        self.calls = 0

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        status, headers = step
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers)
        response._content = b"{}"
        return response


def session(script: list[Any]) -> tuple[BearerSession, Scripted]:
    fake = Scripted(script)
    waits: list[float] = []
    bearer = BearerSession(Token(), "https://graph/.default", session=fake, sleep=waits.append,
                           policy=RetryPolicy(max_attempts=4))
    return bearer, fake


def test_idempotent_requests_retry_drops_and_honour_retry_after() -> None:
    bearer, fake = session([requests.ConnectionError("reset"), (429, {"Retry-After": "2"}), (200, {})])
    assert bearer.request("GET", "https://graph/x").status_code == 200
    assert fake.calls == 3 and bearer.stats.throttled == 1


def test_appending_post_is_not_retried_after_an_ambiguous_failure() -> None:
    bearer, fake = session([requests.ConnectionError("reset"), (200, {})])
    with pytest.raises(ApiError):
        bearer.request("POST", "https://graph/comments", json={}, idempotent=False)
    assert fake.calls == 1
    bearer, fake = session([(500, {}), (200, {})])
    with pytest.raises(ApiError):
        bearer.request("POST", "https://graph/comments", json={}, idempotent=False)
    assert fake.calls == 1


def test_appending_post_is_retried_when_throttled() -> None:
    bearer, fake = session([(429, {"Retry-After": "1"}), (503, {}), (201, {})])
    assert bearer.request("POST", "https://graph/comments", json={}, idempotent=False).status_code == 201
    assert fake.calls == 3
