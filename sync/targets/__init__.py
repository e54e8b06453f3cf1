"""Where Defender incidents are mirrored, behind one small interface, with one module per target:

- :mod:`sync.targets.sentinel_api` (``SYNC_MIRROR_TARGET=sentinel-api``): mirrors created through the incidents API;
- :mod:`sync.targets.defender_portal` (``defender-portal``): mirrors created by the mirror analytics rule from request
  rows, so analysts see them in the unified Defender portal; linked by the app, then updated like the other.

Both share everything after the mirror exists: :class:`~sync.incident_sync.IncidentSyncer` reads, merges (one mapping,
one merge) and writes through this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..budget import Deadline
from ..settings import TenantConfig

Mutate = Callable[[dict[str, Any] | None], dict[str, Any] | None]


class _Unread:
    """Marker: the caller has not read the incident (``write`` reads it itself)."""


UNREAD: Any = _Unread()


@dataclass(frozen=True)
class TargetComment:
    """A comment on the mirror: its ID there, author, creation time and text."""

    comment_id: str
    author: str
    created: str
    text: str


class MirrorTarget(Protocol):
    """Request or create, read, write, and comment on the mirror of one Defender incident."""

    def request_mirror(self, tenant: TenantConfig, defender: dict[str, Any]) -> bool:
        """For an incident with no mirror yet: True when the target has asked for one to be made elsewhere (the
        mirror appears later and is linked then); False when the next :meth:`write` creates it."""
        ...

    def name_for(self, tenant_id: str, incident_id: str) -> str: ...

    def url(self, name: str) -> str: ...

    def read(self, name: str, *, deadline: Deadline) -> dict[str, Any] | None: ...

    def write(self, name: str, mutate: Mutate, *, deadline: Deadline,
              current: dict[str, Any] | None = UNREAD) -> dict[str, Any] | None: ...

    def is_own_mirror(self, tenant_id: str, incident_id: str, *, deadline: Deadline,
                      defender: dict[str, Any] | None = None) -> bool:
        """Whether the Defender incident is itself one of the app's mirrors (never mirrored again)."""
        ...

    def find_builtin(self, tenant_id: str, incident_id: str, *, deadline: Deadline,
                     defender: dict[str, Any] | None = None) -> dict[str, Any] | None: ...

    def may_exist(self, name: str, defender: dict[str, Any], *, deadline: Deadline) -> bool:
        """Whether the mirror may exist although no link names it (False: create it without reading it first)."""
        ...

    def comments(self, name: str, *, deadline: Deadline) -> list[TargetComment]: ...

    def add_comment(self, name: str, comment_id: str, text: str, *, deadline: Deadline) -> None: ...


