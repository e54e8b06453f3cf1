"""The tiny request/response model every emulated service implements, and the fault plan."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class EmuRequest:
    method: str
    path: str                          # URL path without the query string, percent-decoded
    query: dict[str, list[str]]        # parsed query string (keys as sent, e.g. "$filter")
    headers: dict[str, str]            # lower-cased header names
    body: bytes = b""
    raw_target: str = ""               # the request target as sent (path + query)
    base_url: str = ""                 # "https://127.0.0.1:<port>" of the server that received it ("" if unknown)

    def json(self) -> Any:
        import json

        return json.loads(self.body.decode("utf-8"))

    def q(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class EmuResponse:
    status: int
    body: Any = None                   # dict/list -> JSON; bytes/str as is; None -> empty
    headers: dict[str, str] = field(default_factory=dict)


class Service(Protocol):
    name: str                          # "entra", "graph", "ingestion", "sentinel"

    def handle(self, request: EmuRequest) -> EmuResponse: ...


class EmuError(Exception):
    """An error answer raised from deep inside a service's request handling (status, code, message, headers)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class Fault:
    """One injected failure. kind: "status" (status + optional Retry-After), "drop" (close the connection without
    a response), "delay" (sleep ``seconds`` then answer normally)."""

    kind: str
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0


class FaultPlan:
    """Programmable faults per service: queued one-shot faults and predicate rules. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: dict[str, list[tuple[Fault, Callable[[EmuRequest], bool] | None]]] = {}
        self._rules: list[tuple[str, Callable[[EmuRequest], bool], Fault]] = []
        self.injected: dict[str, int] = {}

    def queue(self, service: str, fault: Fault, times: int = 1,
              when: Callable[[EmuRequest], bool] | None = None) -> None:
        """Fail the next ``times`` requests of ``service`` (only those matching ``when``, if given)."""
        with self._lock:
            self._queued.setdefault(service, []).extend([(fault, when)] * times)

    def rule(self, service: str, predicate: Callable[[EmuRequest], bool], fault: Fault) -> None:
        """Fail every request of ``service`` matching ``predicate`` (persistent until :meth:`clear`)."""
        with self._lock:
            self._rules.append((service, predicate, fault))

    def pending(self, service: str | None = None) -> int:
        """How many queued one-shot faults have not fired yet (for ``service``, or all)."""
        with self._lock:
            return sum(len(v) for k, v in self._queued.items() if service is None or k == service)

    def clear(self, counts: bool = False) -> None:
        """Drop every queued fault and rule (and, with ``counts``, the :attr:`injected` counters)."""
        with self._lock:
            self._queued.clear()
            self._rules.clear()
            if counts:
                self.injected.clear()

    def next_fault(self, service: str, request: EmuRequest) -> Fault | None:
        with self._lock:
            fault: Fault | None = None
            queued = self._queued.get(service) or []
            for index, (candidate, when) in enumerate(queued):
                if when is None or when(request):
                    fault = candidate
                    del queued[index]
                    break
            if fault is None:
                for svc, predicate, rule_fault in self._rules:
                    if svc == service and predicate(request):
                        fault = rule_fault
                        break
            if fault is not None:
                self.injected[service] = self.injected.get(service, 0) + 1
            return fault


def match_request(method: str | None = None, path: str | None = None,
                  query: dict[str, str] | None = None) -> Callable[[EmuRequest], bool]:
    """A predicate for :meth:`FaultPlan.rule`/:meth:`FaultPlan.queue`: ``method`` (case-insensitive), ``path`` (a
    regular expression searched in the decoded path) and ``query`` (each named parameter must contain the given text;
    ``""`` means "present")."""
    import re

    pattern = re.compile(path) if path else None
    wanted_method = method.upper() if method else None

    def predicate(request: EmuRequest) -> bool:
        if wanted_method and request.method.upper() != wanted_method:
            return False
        if pattern and not pattern.search(request.path):
            return False
        for key, text in (query or {}).items():
            value = request.q(key)
            if value is None or text not in value:
                return False
        return True

    return predicate
