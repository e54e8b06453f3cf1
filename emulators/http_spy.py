"""What the app sends, seen from inside its process: every request of the app's clients (its ``requests`` sessions
and azure-core's ``requests`` transport) passes through ``requests.adapters.HTTPAdapter.send``, which
:func:`observe_requests` wraps for the time of a ``with`` block. For tests and benchmarks that count requests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests.adapters


@contextmanager
def observe_requests(record: Callable[[requests.PreparedRequest], None]) -> Iterator[None]:
    """Call ``record`` with each request before it is sent, inside the block."""
    original = requests.adapters.HTTPAdapter.send

    def send(adapter: Any, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        record(request)
        return original(adapter, request, *args, **kwargs)

    requests.adapters.HTTPAdapter.send = send  # type: ignore[method-assign]
    try:
        yield
    finally:
        requests.adapters.HTTPAdapter.send = original  # type: ignore[method-assign]
