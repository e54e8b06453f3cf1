"""Explicit sync state in Azure Table Storage.

Tables:
- ``syncTenants``: per-tenant cursor, the time slice in progress with its keyset position, the last run and the
  pull's lease; beside each tenant's row, a row saying when its earliest pending dead letter is due (so an idle run
  reads both in one query and skips the dead-letter table).
- ``syncIncidents``: the last ingested version of each incident and of each of its alerts (dedup), and beside it the
  incident's Defender ⇄ Sentinel link with the merge base (``<incident>!link``), so the pull reads both in one
  RowKey-range query.
- ``syncLeases``: leases other than the pull's (reconcile, per incident), taken with ETag optimistic concurrency.
- ``syncDeadLetters``: what failed permanently or repeatedly, with the error and retry count.
- ``syncLinks``: the index of Sentinel incident names -> links (partition ``~sentinel-name``). Earlier versions kept
  the links here too (partition: tenant); :meth:`StateStore.move_legacy_links` moves them beside their versions.

Transactions stay inside one partition and under the service's 100-operation limit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, TableEntity, TableServiceClient, UpdateMode

from .settings import StorageConfig
from .table_batch import Operation, entity_json, operation_overhead, submit, submit_upserts
from .table_limits import MAX_BATCH_OPS, TableLimitError, check_entity, split_batches, utf16_len
from .timeutil import format_time, parse_time, utcnow

log = logging.getLogger(__name__)

TENANTS = "syncTenants"
INCIDENTS = "syncIncidents"
LEASES = "syncLeases"
DEAD_LETTERS = "syncDeadLetters"
LINKS = "syncLinks"
NAME_INDEX = "~sentinel-name"  # partition of the links table indexing Sentinel incident names
ALL_TABLES = (TENANTS, INCIDENTS, LEASES, DEAD_LETTERS, LINKS)

READ_WORKERS = 8            # concurrent point reads per page
PROPERTY_UNITS = 30_000     # string properties hold 64 KiB of UTF-16 (32,768 units): stay under
ALERT_ROW_CHARS = 400_000   # ASCII JSON of an alerts map per row: 800 KB by the service's formula, under 1 MiB
MAX_ALERT_ROWS = 8          # rows of one incident's alerts map (about 40,000 alerts); more is not kept
ALERT_ROW_SEP = "~alerts~"  # RowKey of an incident's alerts rows: <incident key>~alerts~<n>
# RowKey suffix of an incident's link, beside its version: a RowKey range from the version's key to the link's holds
# nothing else ("!" sorts below every character a key can continue with but a space, and no key holds one).
LINK_SUFFIX = "!link"
LINKS_MOVED = "links-moved"   # marker kind: every link of an earlier version is beside its version now
MOVE_LINKS_PER_CALL = 5_000   # links of an earlier version moved by one call (the rest by the next ones)
DEAD_LETTER_MAX_RETRIES = 5
# Kinds never given up: a failed mirror leaves nothing else that would ever mirror the incident, so it is retried,
# ever more slowly, until it is mirrored or gone (404).
RETRY_FOREVER = frozenset({"mirror"})
BACKOFF_BASE_SECONDS = 60.0
BACKOFF_MAX_SECONDS = 3600.0
# The dead-letter kinds the pull retries; the due time of the earliest pending one is kept beside the tenant's state.
PULL_LETTER_KINDS = ("incident", "ingest", "mirror")
LETTERS_ROW = "~letters"   # RowKey suffix of a tenant's dead-letter due-time row (partition "tenant")
TENANT_LEASE = "pull"      # the scope of the lease kept in the tenant's state entity


class StaleWrite(Exception):
    """A conditional write found the entity changed by another writer since it was read."""


def _key(value: str) -> str:
    """Table keys may not contain / \\ # ? or control characters; "!" is kept for the app's own suffixes (an
    incident ID ending in ``!link`` must not name another incident's link)."""
    return "".join("_" if c in "/\\#?!" or ord(c) < 32 or 127 <= ord(c) < 160 else c for c in value)


@functools.cache
def _read_pool() -> ThreadPoolExecutor:
    """One pool of point-read threads for the process (a pool per page cost thread start-ups on every page)."""
    return ThreadPoolExecutor(max_workers=READ_WORKERS, thread_name_prefix="state-read")


def _utf16_chunks(text: str, units: int) -> list[str]:
    """``text`` cut into pieces of at most ``units`` UTF-16 code units (a character outside the BMP counts two)."""
    if len(text) == utf16_len(text):
        return [text[i:i + units] for i in range(0, len(text), units)] or [""]
    chunks: list[str] = []
    start, used = 0, 0
    for i, char in enumerate(text):
        width = 2 if ord(char) > 0xFFFF else 1
        if used + width > units:
            chunks.append(text[start:i])
            start, used = i, 0
        used += width
    chunks.append(text[start:])
    return chunks


def _split_json(prefix: str, value: Any, *, ascii_only: bool = False) -> dict[str, str]:
    """JSON spread over numbered string properties, because one property holds at most 64 KiB."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only)
    out = {f"{prefix}{i}": chunk for i, chunk in enumerate(_utf16_chunks(text, PROPERTY_UNITS))}
    out[f"{prefix}N"] = str(len(out))
    return out


def _join_json(prefix: str, entity: dict[str, Any], default: Any) -> Any:
    count = entity.get(f"{prefix}N")
    if count is None:
        return default
    text = "".join(str(entity.get(f"{prefix}{i}", "")) for i in range(int(count)))
    try:
        return json.loads(text) if text else default
    except json.JSONDecodeError:
        log.warning("stored JSON is corrupt; ignoring it", extra={"action": "state-read", "property": prefix})
        return default


@dataclass
class TenantState:
    """Progress of one tenant's pull. ``cursor``: every version updated at or before it has been handled."""

    tenant_id: str
    cursor: str | None = None
    slice_lower: str | None = None
    slice_upper: str | None = None
    position: dict[str, Any] | None = None
    read_through: str | None = None          # upper bound of every window ever read (pages may be stored)
    slice_known_through: str | None = None   # read_through as it was when the slice in progress started
    last_run: dict[str, Any] | None = None
    lease_owner: str | None = None            # the pull holding the tenant (see StateStore.take_tenant_lease)
    lease_expires_at: str | None = None
    letters_tracked: bool = False             # the due-time row is kept for this tenant (older states: query)
    letters_due_at: str | None = None         # earliest pending pull letter's next attempt; None: none pending
    letters_etag: str | None = None           # the due-time row as read (None: absent)
    # Incident ID -> version (canonical time; "*" appended when it was handed to the mirror hook) stored in full by
    # the latest completed steps: the overlap re-reads these every run, and this answers them without a Table read.
    recent: dict[str, str] = field(default_factory=dict)
    etag: str | None = None


@dataclass
class IncidentVersion:
    """The last ingested version of an incident and of each of its alerts (canonical timestamps)."""

    incident_id: str
    last_update: str
    alerts: dict[str, str] = field(default_factory=dict)
    partial: bool = False               # only some rows of this version are stored (the rest are sent again)
    incident_row_stored: bool = True
    # The version was handed to the mirror hook by the step that stored it (older entities: False, hooked again).
    mirrored: bool = False


@dataclass
class Lease:
    tenant_id: str
    scope: str
    owner: str
    expires_at: datetime
    etag: str
    in_state: bool = False   # kept in the tenant's state entity (the pull), not in the leases table
    released: bool = False   # already given back by the holder's last write


@dataclass
class DeadLetter:
    tenant_id: str
    kind: str
    key: str
    error: str
    retry_count: int
    first_failed_at: str
    last_failed_at: str
    version: str | None = None
    given_up: bool = False
    next_attempt_at: str | None = None   # not retried before this time (exponential backoff for RETRY_FOREVER)


class StateStore:
    """All reads and writes of the sync state. Thread-safe as far as the underlying clients are."""

    def __init__(self, service: TableServiceClient) -> None:
        self._service = service
        self._clients: dict[str, TableClient] = {}
        # Set once this process has moved every link an earlier version kept in the links table (none are written
        # there any more): from then on a link missing beside its version is absent, with no second read.
        self._legacy_links_moved = False

    @classmethod
    def from_config(cls, config: StorageConfig, credential: TokenCredential | None, **options: Any) -> StateStore:
        """Connection string, or identity-based with the app's credential; ``options``: azure-core client options
        (:func:`sync.http.transport_options`)."""
        if config.connection_string is not None:
            return cls(TableServiceClient.from_connection_string(config.connection_string, **options))
        if credential is None or config.table_uri is None:
            raise ValueError("identity-based state storage needs a table service URI and a credential")
        return cls(TableServiceClient(endpoint=config.table_uri, credential=credential, **options))

    @property
    def service(self) -> TableServiceClient:
        """The Table service the state lives in (other stores of the app keep their tables there too)."""
        return self._service

    def table(self, name: str) -> TableClient:
        client = self._clients.get(name)
        if client is None:
            client = self._service.get_table_client(name)
            self._clients[name] = client
        return client

    def ensure_tables(self) -> None:
        """Create the state tables if they do not exist (idempotent)."""
        for name in ALL_TABLES:
            try:
                self._service.create_table(name)
            except ResourceExistsError:
                pass

    # ----------------------------------------------------------------- tenant progress
    def get_tenant(self, tenant_id: str) -> TenantState:
        """The tenant's progress, lease and dead-letter due time, in one query (a RowKey range over its two rows)."""
        rk = _key(tenant_id)
        rows = {str(e["RowKey"]): e for e in self.table(TENANTS).query_entities(
            "PartitionKey eq 'tenant' and RowKey ge @rk and RowKey le @hint",
            parameters={"rk": rk, "hint": rk + LETTERS_ROW})}
        e, hint = rows.get(rk), rows.get(rk + LETTERS_ROW)
        state = TenantState(tenant_id=tenant_id)
        if hint is not None:
            state.letters_due_at = str(hint.get("DueAt") or "") or None
            state.letters_etag = hint.metadata.get("etag")
        if e is None:
            return state
        state.cursor = e.get("Cursor") or None
        state.slice_lower = e.get("SliceLower") or None
        state.slice_upper = e.get("SliceUpper") or None
        state.position = _join_json("Position", e, None)
        state.read_through = e.get("ReadThrough") or None
        state.slice_known_through = e.get("SliceKnownThrough") or None
        state.last_run = _join_json("LastRun", e, None)
        state.lease_owner = e.get("LeaseOwner") or None
        state.lease_expires_at = e.get("LeaseExpiresAt") or None
        state.letters_tracked = bool(e.get("LettersTracked", False))
        recent = _join_json("Recent", e, {})
        state.recent = {str(k): str(v) for k, v in recent.items()} if isinstance(recent, dict) else {}
        state.etag = e.metadata.get("etag")
        return state

    def save_tenant(self, state: TenantState) -> None:
        """Write the tenant's progress (replace: absent fields are cleared) if it is still as read (``If-Match`` on
        ``state.etag``; None: it must not exist yet), and keep the new ETag in ``state``. Raises :class:`StaleWrite`
        when another owner wrote it meanwhile: an old lease holder never overwrites a new one's progress."""
        entity: dict[str, Any] = {
            "PartitionKey": "tenant", "RowKey": _key(state.tenant_id), "TenantId": state.tenant_id,
            "Cursor": state.cursor or "", "SliceLower": state.slice_lower or "", "SliceUpper": state.slice_upper or "",
            "ReadThrough": state.read_through or "", "SliceKnownThrough": state.slice_known_through or "",
            "LeaseOwner": state.lease_owner or "", "LeaseExpiresAt": state.lease_expires_at or "",
            "LettersTracked": state.letters_tracked,
        }
        entity.update(_split_json("Position", state.position))
        entity.update(_split_json("LastRun", state.last_run))
        if state.recent:
            entity.update(_split_json("Recent", state.recent))
        check_entity(entity)  # a clear error naming the limit instead of the service's 400
        table = self.table(TENANTS)
        try:
            if state.etag is None:
                meta = table.create_entity(entity)
            else:
                meta = table.update_entity(entity, mode=UpdateMode.REPLACE, etag=state.etag,
                                           match_condition=MatchConditions.IfNotModified)
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError) as exc:
            raise StaleWrite(f"tenant {state.tenant_id}: its progress was written by another owner since it was "
                             "read; not overwritten") from exc
        state.etag = str(meta["etag"])

    # ----------------------------------------------------------------- ingested versions
    def get_versions(self, tenant_id: str, incident_ids: Iterable[str]) -> dict[str, IncidentVersion]:
        """The stored versions of these incidents, by concurrent point reads on one pool kept for the process.

        Point reads cost the same however many incidents a tenant has. An ``or`` of RowKeys is a partition scan
        that grows with the tenant (13 ms per page at 2k incidents, 71 ms at 50k). A RowKey range query over a
        page's IDs (about 4 ms of client CPU for 50 entities against 1.8 ms per point read) was measured too: a
        page is ordered by update time, not by ID, so its IDs span most of the partition and the query returned
        hundreds of entities not asked for (bench at 10k: nearly every page), then still needed point reads.
        """
        ids = list(dict.fromkeys(incident_ids))
        table = self.table(INCIDENTS)
        pk = _key(tenant_id)

        def read(incident_id: str) -> IncidentVersion | None:
            try:
                return self._version_from(pk, table.get_entity(pk, _key(incident_id)))
            except ResourceNotFoundError:
                return None

        return {v.incident_id: v for v in _read_pool().map(read, ids) if v is not None}

    def get_versions_and_links(self, tenant_id: str, incident_ids: Iterable[str]
                               ) -> tuple[dict[str, IncidentVersion], dict[str, dict[str, Any] | None]]:
        """The stored versions of these incidents and their links, by one concurrent RowKey-range query each (the
        version's key to its link's: the two entities and nothing else). Links: incident ID -> link, None when it
        has none; an incident is left out when that is not known (the links of an earlier version could not be
        moved yet: :meth:`get_link` reads the old place)."""
        known_absent = self._ensure_links_moved()
        ids = list(dict.fromkeys(incident_ids))
        table = self.table(INCIDENTS)
        pk = _key(tenant_id)

        def read(incident_id: str) -> tuple[str, IncidentVersion | None, dict[str, Any] | None]:
            rk = _key(incident_id)
            found = {str(e["RowKey"]): e for e in table.query_entities(
                "PartitionKey eq @pk and RowKey ge @rk and RowKey le @link",
                parameters={"pk": pk, "rk": rk, "link": rk + LINK_SUFFIX})}
            head, link = found.get(rk), found.get(rk + LINK_SUFFIX)
            return (incident_id, self._version_from(pk, head) if head is not None else None,
                    _link_from(link) if link is not None else None)

        versions: dict[str, IncidentVersion] = {}
        links: dict[str, dict[str, Any] | None] = {}
        for incident_id, version, link in _read_pool().map(read, ids):
            if version is not None:
                versions[version.incident_id] = version
            if link is not None or known_absent:
                links[incident_id] = link
        return versions, links

    def _version_from(self, pk: str, e: TableEntity) -> IncidentVersion:
        """The version a head entity holds (its alerts map from its alert rows when it has any)."""
        rows = int(e.get("AlertRows", 0) or 0)
        alerts = _join_json("Alerts", e, {}) if not rows else self._read_alert_rows(
            pk, str(e["RowKey"]), rows, str(e.get("AlertGen", "")))
        return IncidentVersion(incident_id=str(e["IncidentId"]), last_update=str(e["LastUpdate"]),
                               alerts=alerts, partial=bool(e.get("Partial", False)),
                               incident_row_stored=bool(e.get("IncidentRowStored", True)),
                               mirrored=bool(e.get("Mirrored", False)))

    def _read_alert_rows(self, pk: str, rk: str, rows: int, gen: str) -> dict[str, str]:
        """The alerts map spread over ``rows`` rows; {} when a row is missing or from another write (torn)."""
        alerts: dict[str, str] = {}
        for n in range(rows):
            try:
                e = self.table(INCIDENTS).get_entity(pk, f"{rk}{ALERT_ROW_SEP}{n}")
            except ResourceNotFoundError:
                e = None
            part = _join_json("Alerts", e, None) if e is not None and e.get("AlertGen") == gen else None
            if not isinstance(part, dict):
                log.warning("an incident's alert versions are incomplete; its alerts are written again",
                            extra={"action": "state-read", "outcome": "torn", "incidentId": rk})
                return {}
            alerts.update(part)
        return alerts

    def save_versions(self, tenant_id: str, versions: Iterable[IncidentVersion]) -> list[str]:
        """Record ingested versions in transactions that keep the service's limits (100 operations, 4 MiB body,
        1 MiB per entity by its formula). An alerts map too large for one entity is spread over extra rows, written
        in the same transaction as the version where it fits, and before it otherwise. Returns the IDs of incidents
        whose alerts map is too large even for that: their version is stored without it (the cursor moves on; their
        alerts are written again with the next version)."""
        pk = _key(tenant_id)
        groups: list[list[dict[str, Any]]] = []
        dropped: list[str] = []
        for v in versions:
            group = self._version_entities(pk, v)
            if group is None:
                dropped.append(v.incident_id)
                log.warning("an incident's alert versions are too many to keep; its version is stored without them",
                            extra={"tenantId": tenant_id, "incidentId": v.incident_id, "action": "state-write",
                                   "outcome": "alerts-dropped", "alerts": len(v.alerts)})
                group = self._version_entities(pk, IncidentVersion(v.incident_id, v.last_update, {}, v.partial,
                                                                   v.incident_row_stored, v.mirrored))
                assert group is not None
            groups.append(group)
        table = self.table(INCIDENTS)
        table_url = f"{table.scheme}://{table._primary_hostname}/{table.table_name}"
        # Each entity serialised once: its text sizes the transactions and is their body (sync.table_batch).
        ops = [[(e, entity_json(e)) for e in group] for group in groups]
        for batch in split_batches(ops, lambda op: len(op[1]) + operation_overhead(table_url, op[0])):
            submit_upserts(table, batch)
        return dropped

    @staticmethod
    def _version_entities(pk: str, v: IncidentVersion) -> list[dict[str, Any]] | None:
        """The version's entities, its head (the row every read starts from) last; None when the alerts map does
        not fit :data:`MAX_ALERT_ROWS` rows."""
        rk = _key(v.incident_id)
        head: dict[str, Any] = {"PartitionKey": pk, "RowKey": rk, "IncidentId": v.incident_id,
                                "LastUpdate": v.last_update, "Partial": v.partial,
                                "IncidentRowStored": v.incident_row_stored, "Mirrored": v.mirrored}
        inline = {**head, **_split_json("Alerts", v.alerts)}
        try:
            check_entity(inline)
            return [inline]
        except TableLimitError:
            pass
        parts: list[dict[str, str]] = [{}]
        used = 0
        for alert_id, version in v.alerts.items():
            cost = len(json.dumps(alert_id)) + len(json.dumps(version)) + 2
            if used + cost > ALERT_ROW_CHARS and parts[-1]:
                parts.append({})
                used = 0
            parts[-1][alert_id] = version
            used += cost
        if len(parts) > MAX_ALERT_ROWS:
            return None
        gen = hashlib.sha256(json.dumps(v.alerts, sort_keys=True).encode()).hexdigest()[:16]
        rows = [{"PartitionKey": pk, "RowKey": f"{rk}{ALERT_ROW_SEP}{n}", "AlertGen": gen,
                 **_split_json("Alerts", part, ascii_only=True)} for n, part in enumerate(parts)]
        for row in rows:
            check_entity(row)
        return [*rows, {**head, "AlertRows": len(rows), "AlertGen": gen}]

    # ----------------------------------------------------------------- leases
    def take_tenant_lease(self, state: TenantState, owner: str, seconds: float) -> Lease | None:
        """Take the pull's lease of a tenant, kept in its state entity: one ``If-Match`` write of ``state`` as read
        (which is also the run's first checkpoint). None when another owner holds an unexpired lease, or when the
        state was written since it was read (another instance got there first)."""
        now = utcnow()
        if (state.lease_owner not in (None, owner) and state.lease_expires_at
                and parse_time(state.lease_expires_at) > now):
            return None
        before = (state.lease_owner, state.lease_expires_at)
        expires = now + timedelta(seconds=seconds)
        state.lease_owner, state.lease_expires_at = owner, format_time(expires)
        try:
            self.save_tenant(state)
        except StaleWrite:
            state.lease_owner, state.lease_expires_at = before
            return None
        assert state.etag is not None
        return Lease(state.tenant_id, TENANT_LEASE, owner, expires, state.etag, in_state=True)

    def acquire_lease(self, tenant_id: str, scope: str, owner: str, seconds: float) -> Lease | None:
        """Take the tenant's lease for ``scope`` if it is free or expired; None if another owner holds it."""
        table = self.table(LEASES)
        rk = _key(f"{scope}|{tenant_id}")
        now = utcnow()
        expires = now + timedelta(seconds=seconds)
        entity = {"PartitionKey": "lease", "RowKey": rk, "Owner": owner, "ExpiresAt": format_time(expires)}
        try:  # a released lease is deleted: creating it is the common case, one call
            meta = table.create_entity(entity)
            return Lease(tenant_id, scope, owner, expires, str(meta["etag"]))
        except ResourceExistsError:
            pass
        try:
            current = table.get_entity("lease", rk)
        except ResourceNotFoundError:
            return None  # released just now by its holder: the next try takes it
        held_until = parse_time(str(current.get("ExpiresAt") or "1970-01-01T00:00:00Z"))
        if current.get("Owner") != owner and held_until > now:
            return None
        try:
            meta = table.update_entity(entity, mode=UpdateMode.REPLACE, etag=current.metadata["etag"],
                                       match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            return None
        return Lease(tenant_id, scope, owner, expires, str(meta["etag"]))

    def renew_lease(self, lease: Lease, seconds: float) -> bool:
        """Extend a held lease; False when it was lost (expired and taken by another owner)."""
        expires = utcnow() + timedelta(seconds=seconds)
        if lease.in_state:
            return self._merge_tenant_lease(lease, lease.owner, expires)
        entity = {"PartitionKey": "lease", "RowKey": _key(f"{lease.scope}|{lease.tenant_id}"), "Owner": lease.owner,
                  "ExpiresAt": format_time(expires)}
        try:
            meta = self.table(LEASES).update_entity(entity, mode=UpdateMode.REPLACE, etag=lease.etag,
                                                    match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        lease.etag = str(meta["etag"])
        lease.expires_at = expires
        return True

    def release_lease(self, lease: Lease) -> None:
        """Give the lease back at once (only if we still hold it)."""
        if lease.in_state:
            if not lease.released:
                self._merge_tenant_lease(lease, None, None)
            return
        try:
            self.table(LEASES).delete_entity("lease", _key(f"{lease.scope}|{lease.tenant_id}"), etag=lease.etag,
                                             match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            pass

    def acquire_leases(self, tenant_id: str, scopes: Iterable[str], owner: str, seconds: float
                       ) -> dict[str, Lease | None]:
        """Take several of the tenant's leases (the entities :meth:`acquire_lease` takes) in transactions of
        inserts; a transaction refused because one of its leases exists (held, or expired and not yet taken over)
        takes its leases one by one with :meth:`acquire_lease`. Returns each scope's lease, None where another owner
        holds it."""
        expires = utcnow() + timedelta(seconds=seconds)
        ops = [Operation("insert", e, entity_json(e)) for e in (_lease_entity(tenant_id, scope, owner, expires)
                                                                for scope in dict.fromkeys(scopes))]
        taken: dict[str, Lease | None] = {}
        for etags, batch in _transactions(self.table(LEASES), ops, "lease"):
            for n, op in enumerate(batch):
                scope = str(op.entity["Scope"])
                etag = etags[n] if etags is not None else None
                taken[scope] = Lease(tenant_id, scope, owner, expires, etag) if etag else \
                    self.acquire_lease(tenant_id, scope, owner, seconds)
        return taken

    def renew_leases(self, leases: list[Lease], seconds: float) -> bool:
        """Extend held leases of the leases table together, in transactions of ``If-Match`` replaces. False when a
        transaction was refused because one of its leases changed or is gone (taken by another owner: count them all
        lost); raises on any other failure (try again)."""
        expires = utcnow() + timedelta(seconds=seconds)
        by_scope = {lease.scope: lease for lease in leases}
        ops = [Operation("replace", e, entity_json(e), lease.etag)
               for lease in leases for e in [_lease_entity(lease.tenant_id, lease.scope, lease.owner, expires)]]
        for start in range(0, len(ops), MAX_BATCH_OPS):   # lease entities are small: the count is the limit
            batch = ops[start:start + MAX_BATCH_OPS]
            try:
                etags = submit(self.table(LEASES), batch)
            except HttpResponseError as exc:
                if exc.status_code in (404, 412):
                    return False
                raise
            for op, etag in zip(batch, etags, strict=True):
                lease = by_scope[str(op.entity["Scope"])]
                lease.etag, lease.expires_at = etag or lease.etag, expires
        return True

    def release_leases(self, leases: list[Lease]) -> None:
        """Give held leases of the leases table back in transactions of ``If-Match`` deletes; those of a refused
        transaction one by one (:meth:`release_lease`: only those still ours)."""
        by_scope = {lease.scope: lease for lease in leases}
        ops = [Operation("delete", _lease_entity(lease.tenant_id, lease.scope, lease.owner, lease.expires_at),
                         etag=lease.etag) for lease in leases]
        for etags, batch in _transactions(self.table(LEASES), ops, "lease"):
            if etags is None:
                for op in batch:
                    self.release_lease(by_scope[str(op.entity["Scope"])])

    def _merge_tenant_lease(self, lease: Lease, owner: str | None, expires: datetime | None) -> bool:
        """Set (or clear) the lease fields of the tenant's state entity if it is as the holder last wrote it."""
        entity = {"PartitionKey": "tenant", "RowKey": _key(lease.tenant_id), "LeaseOwner": owner or "",
                  "LeaseExpiresAt": format_time(expires) if expires else ""}
        try:
            meta = self.table(TENANTS).update_entity(entity, mode=UpdateMode.MERGE, etag=lease.etag,
                                                     match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        lease.etag = str(meta["etag"])
        if expires is None:
            lease.released = True
        else:
            lease.expires_at = expires
        return True

    # ----------------------------------------------------------------- dead letters
    def dead_letter(self, tenant_id: str, kind: str, key: str, error: str, *, version: str | None = None,
                    max_retries: int = DEAD_LETTER_MAX_RETRIES, backoff: bool = True) -> DeadLetter:
        """Record (or count again) a failure. After ``max_retries`` the entry is marked given up, except for the
        kinds in :data:`RETRY_FOREVER`, which are due again at the next run, then wait twice as long after each
        further failure (one minute first, up to an hour;
        ``backoff=False``: due again at once, for a failure that says nothing about the incident, e.g. it was busy)."""
        table = self.table(DEAD_LETTERS)
        rk = _key(f"{kind}|{key}")
        clock = utcnow()
        now = format_time(clock)
        try:
            e = table.get_entity(_key(tenant_id), rk)
            retries = int(e.get("RetryCount", 0)) + 1
            first = str(e.get("FirstFailedAt", now))
        except ResourceNotFoundError:
            retries, first = 0, now
        forever = kind in RETRY_FOREVER
        # The first retry is due at once (the next run: most failures are one crash or one blip); then 1, 2, 4 ...
        # minutes, up to an hour.
        wait = (min(BACKOFF_BASE_SECONDS * 2 ** min(retries - 1, 20), BACKOFF_MAX_SECONDS)
                if forever and backoff and retries > 0 else 0.0)
        letter = DeadLetter(tenant_id, kind, key, error[:2000], retries, first, now, version,
                            given_up=not forever and retries >= max_retries,
                            next_attempt_at=format_time(clock + timedelta(seconds=wait)))
        table.upsert_entity({
            "PartitionKey": _key(tenant_id), "RowKey": rk, "Kind": kind, "Key": key, "Error": letter.error,
            "RetryCount": retries, "FirstFailedAt": first, "LastFailedAt": now, "Version": version or "",
            "GivenUp": letter.given_up, "NextAttemptAt": letter.next_attempt_at,
        }, mode=UpdateMode.REPLACE)
        if kind in PULL_LETTER_KINDS and not letter.given_up:
            self._letters_due_by(tenant_id, letter.next_attempt_at or now)
        return letter

    def _letters_due_by(self, tenant_id: str, due_at: str) -> None:
        """Make the tenant's due-time row say at the latest ``due_at`` (so the pull's next run looks at its letters
        in time); conditional writes, so two writers never raise it past either one's letter."""
        table = self.table(TENANTS)
        rk = _key(tenant_id) + LETTERS_ROW
        for _ in range(5):
            try:
                e = table.get_entity("tenant", rk)
            except ResourceNotFoundError:
                e = None
            current = str(e.get("DueAt") or "") if e is not None else ""
            if current and parse_time(current) <= parse_time(due_at):
                return
            entity = {"PartitionKey": "tenant", "RowKey": rk, "DueAt": due_at}
            try:
                if e is None:
                    table.create_entity(entity)
                else:
                    table.update_entity(entity, mode=UpdateMode.REPLACE, etag=e.metadata["etag"],
                                        match_condition=MatchConditions.IfNotModified)
                return
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                continue  # another writer moved it: look again
        log.warning("could not record when a dead letter is due; the pull looks at its letters every run until a "
                    "run records it", extra={"tenantId": tenant_id, "action": "state-write", "outcome": "retry"})
        try:  # a row the pull cannot read as a time makes it query its letters (see ``letters_due``)
            table.upsert_entity({"PartitionKey": "tenant", "RowKey": rk, "DueAt": "1970-01-01T00:00:00Z"},
                                mode=UpdateMode.REPLACE)
        except Exception:
            log.warning("could not mark the dead letters due", exc_info=True, extra={"tenantId": tenant_id})

    def set_letters_due(self, state: TenantState, due_at: str | None) -> None:
        """After the pull read every pending letter: record when the earliest is due (None: none pending), unless
        a letter was written since ``state`` was read (then the row stays as that writer left it, early enough)."""
        table = self.table(TENANTS)
        rk = _key(state.tenant_id) + LETTERS_ROW
        try:
            if due_at is None:
                if state.letters_etag is not None:
                    table.delete_entity("tenant", rk, etag=state.letters_etag,
                                        match_condition=MatchConditions.IfNotModified)
            elif state.letters_etag is None:
                table.create_entity({"PartitionKey": "tenant", "RowKey": rk, "DueAt": due_at})
            else:
                table.update_entity({"PartitionKey": "tenant", "RowKey": rk, "DueAt": due_at},
                                    mode=UpdateMode.REPLACE, etag=state.letters_etag,
                                    match_condition=MatchConditions.IfNotModified)
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
            return
        state.letters_due_at = due_at

    def dead_letters(self, tenant_id: str, *, pending_only: bool = False) -> Iterator[DeadLetter]:
        query = "PartitionKey eq @pk" + (" and GivenUp eq false" if pending_only else "")
        for e in self.table(DEAD_LETTERS).query_entities(query, parameters={"pk": _key(tenant_id)}):
            yield DeadLetter(tenant_id, str(e["Kind"]), str(e["Key"]), str(e.get("Error", "")),
                             int(e.get("RetryCount", 0)), str(e.get("FirstFailedAt", "")),
                             str(e.get("LastFailedAt", "")), str(e.get("Version") or "") or None,
                             bool(e.get("GivenUp", False)), str(e.get("NextAttemptAt") or "") or None)

    def resolve_dead_letter(self, tenant_id: str, kind: str, key: str) -> None:
        try:
            self.table(DEAD_LETTERS).delete_entity(_key(tenant_id), _key(f"{kind}|{key}"))
        except ResourceNotFoundError:
            pass

    # ----------------------------------------------------------------- markers (other per-tenant progress)
    def get_marker(self, kind: str, tenant_id: str) -> dict[str, Any]:
        """A small JSON record per tenant kept apart from the pull's progress (e.g. the reconcile cursor)."""
        pk, rk = _marker_key(kind, tenant_id)
        try:
            e = self.table(TENANTS).get_entity(pk, rk)
        except ResourceNotFoundError:
            return {}
        value = _join_json("Value", e, {})
        return value if isinstance(value, dict) else {}

    def set_marker(self, kind: str, tenant_id: str, value: dict[str, Any]) -> None:
        pk, rk = _marker_key(kind, tenant_id)
        entity: dict[str, Any] = {"PartitionKey": pk, "RowKey": rk}
        entity.update(_split_json("Value", value))
        check_entity(entity)
        self.table(TENANTS).upsert_entity(entity, mode=UpdateMode.REPLACE)

    def note_once(self, kind: str, tenant_id: str) -> bool:
        """True the first time ``kind`` is noted for the tenant, False ever after (for say-it-once reports)."""
        pk, rk = _marker_key(f"note|{kind}", tenant_id)
        try:
            self.table(TENANTS).create_entity({"PartitionKey": pk, "RowKey": rk, "NotedAt": format_time(utcnow())})
        except ResourceExistsError:
            return False
        return True

    # ----------------------------------------------------------------- links (mirror state)
    def get_link(self, tenant_id: str, incident_id: str) -> dict[str, Any] | None:
        """The incident's link (with the ``etag`` it was read at), or None. One read; a link an earlier version
        kept in the links table is moved beside the incident's version first."""
        pk, rk = _key(tenant_id), _key(incident_id) + LINK_SUFFIX
        table = self.table(INCIDENTS)
        try:
            return _link_from(table.get_entity(pk, rk))
        except ResourceNotFoundError:
            if self._links_moved():
                return None
        try:
            legacy = self.table(LINKS).get_entity(pk, _key(incident_id))
        except ResourceNotFoundError:
            legacy = None
        if legacy is not None:
            self._move_links([legacy])
        # Read again also when there was none to move: a concurrent move inserts the link before it deletes the old.
        try:
            return _link_from(table.get_entity(pk, rk))
        except ResourceNotFoundError:
            return None

    def get_links(self, tenant_id: str, incident_ids: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """The links of these incidents (None: no link), by concurrent point reads on the process's read pool."""
        ids = list(dict.fromkeys(incident_ids))
        return dict(zip(ids, _read_pool().map(lambda i: self.get_link(tenant_id, i), ids), strict=True))

    def save_link(self, tenant_id: str, incident_id: str, link: dict[str, Any], *, etag: str | None) -> bool:
        """Write a link; ``etag`` is the version read (None: create). False when another writer got there first."""
        entity = _link_entity(tenant_id, incident_id, link)
        table = self.table(INCIDENTS)
        try:
            if etag is None:
                # The name index first: a crash in between leaves an index row that points at no link (harmless).
                self.table(LINKS).upsert_entity(_name_index_entity(tenant_id, incident_id, entity),
                                                mode=UpdateMode.REPLACE)
                table.create_entity(entity)
            else:
                table.update_entity(entity, mode=UpdateMode.REPLACE, etag=etag,
                                    match_condition=MatchConditions.IfNotModified)
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
            return False
        return True

    def create_links(self, tenant_id: str, links: dict[str, dict[str, Any]]) -> list[str]:
        """Create new links (incident ID -> link) in transactions: their name-index rows first (upserts in the index
        partition, so a crash in between leaves index rows pointing at no link: harmless), then the links (inserts
        in the tenant's partition: a transaction is refused whole if any of its links exists). Returns the IDs of
        the links not written (their transaction was refused or failed): the caller creates those one by one."""
        entities = {i: _link_entity(tenant_id, i, link) for i, link in links.items()}
        index = [Operation("upsert", e, entity_json(e))
                 for e in (_name_index_entity(tenant_id, i, entities[i]) for i in entities)]
        unwritten: list[str] = []
        writable: set[str] = set()
        for etags, batch in _transactions(self.table(LINKS), index, "link"):
            (writable.update if etags is not None else unwritten.extend)(str(op.entity["IncidentId"]) for op in batch)
        rows = [Operation("insert", e, entity_json(e)) for i, e in entities.items() if i in writable]
        for etags, batch in _transactions(self.table(INCIDENTS), rows, "link"):
            if etags is None:
                unwritten.extend(str(op.entity["IncidentId"]) for op in batch)
        return unwritten

    def replace_links(self, tenant_id: str, links: dict[str, tuple[dict[str, Any], str]]) -> list[str]:
        """Write existing links (incident ID -> (link, the ETag it was read at)) in transactions of ``If-Match``
        replaces in the tenant's partition: a transaction is refused whole if any of its links changed since it was
        read. Returns the IDs of the links not written: the caller saves those one by one (``save_link``)."""
        return [i for i, etag in self._replace_links(tenant_id, links).items() if etag is None]

    def confirm_links(self, tenant_id: str, links: dict[str, tuple[dict[str, Any], str]]) -> dict[str, str | None]:
        """Whether links read earlier (incident ID -> (link, the ETag it was read at)) are still as read: each is
        written back unchanged, ``If-Match`` its ETag, in transactions. Returns each one's new ETag, None where its
        transaction was refused (one of its links changed: read those again)."""
        return self._replace_links(tenant_id, links)

    def _replace_links(self, tenant_id: str, links: dict[str, tuple[dict[str, Any], str]]) -> dict[str, str | None]:
        ops = [Operation("replace", e, entity_json(e), etag)
               for e, etag in ((_link_entity(tenant_id, i, link), etag) for i, (link, etag) in links.items())]
        written: dict[str, str | None] = {}
        for etags, batch in _transactions(self.table(INCIDENTS), ops, "link"):
            for n, op in enumerate(batch):
                written[str(op.entity["IncidentId"])] = etags[n] if etags is not None else None
        return written

    def find_link_by_sentinel_name(self, sentinel_name: str) -> tuple[str, str, dict[str, Any]] | None:
        """(tenant ID, incident ID, link) for a Sentinel incident name, or None if the app does not mirror it."""
        try:
            index = self.table(LINKS).get_entity(NAME_INDEX, _key(sentinel_name.lower()))
        except ResourceNotFoundError:
            return None
        tenant_id, incident_id = str(index["TenantId"]), str(index["IncidentId"])
        link = self.get_link(tenant_id, incident_id)
        return (tenant_id, incident_id, link) if link is not None else None

    def iter_links(self, tenant_id: str, after: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
        """The tenant's links in key order, starting after the incident ID ``after`` (for a resumable sweep). Links
        of an earlier version are moved first (:data:`MOVE_LINKS_PER_CALL` a call), so the sweep sees them once they
        are all moved."""
        self._ensure_links_moved()
        query, params = "PartitionKey eq @pk and IsLink eq true", {"pk": _key(tenant_id)}
        if after:
            query += " and RowKey gt @after"
            params["after"] = _key(after) + LINK_SUFFIX
        for e in self.table(INCIDENTS).query_entities(query, parameters=params):
            yield str(e["IncidentId"]), _link_from(e)

    def move_legacy_links(self, limit: int = MOVE_LINKS_PER_CALL) -> int:
        """Move links an earlier version kept in the links table (partition: tenant) beside their incidents'
        versions, about ``limit`` a call; returns how many were moved. When none are left, a marker says so for
        every process (read once per process). Idempotent and safe beside other movers and writers: a link is
        inserted in its new place (never over one written there since) before its old row is deleted
        (``If-Match``: a row changed meanwhile is moved by the next call)."""
        if self._links_moved():
            return 0
        moved = seen = 0
        # Two key ranges around the name index, whose rows stay: a filter excluding it would scan all of them.
        for query in ("PartitionKey lt @index", "PartitionKey gt @index"):
            for page in self.table(LINKS).query_entities(query, parameters={"index": NAME_INDEX},
                                                         results_per_page=min(limit, 1000)).by_page():
                rows = list(page)
                seen += len(rows)
                moved += self._move_links(rows)
                if seen >= limit:
                    self._log_moved(moved)
                    return moved   # the next call goes on (moved rows are gone from the old place)
        self.set_marker(LINKS_MOVED, "all", {"movedAt": format_time(utcnow())})
        self._legacy_links_moved = True
        self._log_moved(moved)
        return moved

    def _links_moved(self) -> bool:
        """Whether every link of an earlier version is moved: known to this process, or said by the marker."""
        if not self._legacy_links_moved:
            self._legacy_links_moved = bool(self.get_marker(LINKS_MOVED, "all").get("movedAt"))
        return self._legacy_links_moved

    def _ensure_links_moved(self) -> bool:
        """Move what is left of the links of an earlier version (a failure is logged; the next call tries again
        and meanwhile :meth:`get_link` reads the old place); whether none are left."""
        if self._legacy_links_moved:
            return True
        try:
            self.move_legacy_links()
        except AzureError as exc:
            log.warning("links of an earlier version not moved yet", extra={
                "action": "state-migrate", "outcome": "failed", "error": str(exc)[:300]})
        return self._legacy_links_moved

    @staticmethod
    def _log_moved(moved: int) -> None:
        if moved:
            log.info("links moved beside their incidents' versions", extra={
                "action": "state-migrate", "outcome": "moved", "links": moved})

    def _move_links(self, legacy: list[TableEntity]) -> int:
        """Insert links read from the links table beside their versions (those there already are left as they are)
        and delete the old rows; returns how many were inserted."""
        moved = 0
        by_partition: dict[str, list[TableEntity]] = {}
        for e in legacy:
            by_partition.setdefault(str(e["PartitionKey"]), []).append(e)
        for rows in by_partition.values():
            inserts = [Operation("insert", e, entity_json(e)) for e in (
                {**row, "RowKey": _key(str(row["IncidentId"])) + LINK_SUFFIX, "IsLink": True}
                for row in rows)]
            for etags, batch in _transactions(self.table(INCIDENTS), inserts, "link move"):
                if etags is not None:
                    moved += len(batch)
                    continue
                for op in batch:   # refused whole: one of them is there already
                    try:
                        self.table(INCIDENTS).create_entity(dict(op.entity))
                        moved += 1
                    except ResourceExistsError:
                        pass
            # The old rows go only once their links are in place; one left behind (the delete failed) is moved
            # again by the next call, whose insert finds the link there and leaves it.
            deletes = [Operation("delete", row, etag=str(row.metadata["etag"])) for row in rows]
            for etags, batch in _transactions(self.table(LINKS), deletes, "link move"):
                if etags is None:
                    for op in batch:
                        try:
                            self.table(LINKS).delete_entity(str(op.entity["PartitionKey"]), str(op.entity["RowKey"]),
                                                            etag=op.etag, match_condition=MatchConditions.IfNotModified)
                        except AzureError:
                            pass
        return moved


def _link_entity(tenant_id: str, incident_id: str, link: dict[str, Any]) -> dict[str, Any]:
    """The incidents-table entity of a link (its ``etag`` is not stored), beside the incident's version."""
    body = {k: v for k, v in link.items() if k != "etag"}
    entity: dict[str, Any] = {"PartitionKey": _key(tenant_id), "RowKey": _key(incident_id) + LINK_SUFFIX,
                              "IncidentId": incident_id, "SentinelName": str(body.get("sentinelName", "")),
                              "IsLink": True}
    entity.update(_split_json("Link", body))
    check_entity(entity)
    return entity


def _link_from(e: TableEntity) -> dict[str, Any]:
    """The link an entity holds, with the ``etag`` it was read at."""
    return {"etag": e.metadata.get("etag"), **_join_json("Link", e, {})}


def _lease_entity(tenant_id: str, scope: str, owner: str, expires: datetime) -> dict[str, Any]:
    """The leases-table entity of a lease (the entity :meth:`StateStore.acquire_lease` writes, with its scope)."""
    return {"PartitionKey": "lease", "RowKey": _key(f"{scope}|{tenant_id}"), "Owner": owner,
            "ExpiresAt": format_time(expires), "Scope": scope}


def _name_index_entity(tenant_id: str, incident_id: str, link_entity: dict[str, Any]) -> dict[str, Any]:
    """The name-index row of a link: its Sentinel incident name (lower case) -> tenant and incident."""
    return {"PartitionKey": NAME_INDEX, "RowKey": _key(str(link_entity["SentinelName"]).lower()),
            "TenantId": tenant_id, "IncidentId": incident_id}


def _transactions(table: TableClient, ops: list[Operation], what: str
                  ) -> Iterator[tuple[list[str | None] | None, list[Operation]]]:
    """Submit ``ops`` of one partition in transactions within the service's limits; yields (the new ETags, or None
    when it was not written, its operations) per transaction. A refused or failed one writes nothing."""
    table_url = f"{table.scheme}://{table._primary_hostname}/{table.table_name}"
    for batch in split_batches([[op] for op in ops], lambda op: len(op.text) + operation_overhead(table_url,
                                                                                                 op.entity)):
        try:
            etags = submit(table, batch)
        except AzureError as exc:
            log.info("%s transaction not written; the caller takes its operations up one by one", what, extra={
                "action": "state-write", "outcome": "batch-failed", "operations": len(batch), "error": str(exc)[:300]})
            yield None, batch
            continue
        yield etags, batch


def _marker_key(kind: str, tenant_id: str) -> tuple[str, str]:
    return _key(f"marker|{kind}"), _key(tenant_id)


def run_record(started: datetime, finished: datetime, outcome: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The ``lastRun`` block kept with each tenant's state."""
    return {"startedAt": format_time(started), "finishedAt": format_time(finished), "outcome": outcome,
            "summary": summary}
