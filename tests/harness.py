"""Drive the deployed surface as the Functions host would: load ``function_app.py``, find each function through
``app.get_functions()`` and call it with real ``azure.functions`` request, timer and queue objects."""

from __future__ import annotations

import importlib
import json
from collections import Counter
from typing import Any

import azure.functions as func
from azure.functions.timer import TimerRequest

_FUNCTIONS: dict[str, Any] = {}


def functions() -> dict[str, Any]:
    """Function name -> the user function, as the host indexes them (indexed once, like the host does)."""
    if not _FUNCTIONS:
        module = importlib.import_module("function_app")
        _FUNCTIONS.update({f.get_function_name(): f.get_user_function() for f in module.app.get_functions()})
    return _FUNCTIONS


def run_timer(name: str) -> None:
    functions()[name](TimerRequest(past_due=False))


def run_queue(body: str | bytes) -> None:
    data = body.encode("utf-8") if isinstance(body, str) else body
    functions()["tenant_pull"](func.QueueMessage(id="1", body=data))


def http(name: str, method: str = "POST", body: Any = None, *, raw: bytes | None = None,
         content_type: str | None = "application/json", route: str = "",
         params: dict[str, str] | None = None) -> tuple[int, Any]:
    """Invoke an HTTP function; returns (status, parsed JSON or text)."""
    payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode("utf-8"))
    headers = {"content-type": content_type} if content_type else {}
    request = func.HttpRequest(method=method, url=f"https://app.local/api/{route or name}", headers=headers,
                               params=params or {}, route_params={}, body=payload)
    response = functions()[name](request)
    text = response.get_body().decode("utf-8")
    try:
        return response.status_code, json.loads(text)
    except json.JSONDecodeError:
        return response.status_code, text


def version_counts(rows: list[dict[str, Any]], *keys: str) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(r.get(k) for k in keys) for r in rows)
