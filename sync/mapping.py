"""Pure Defender XDR (Graph) ⇄ Microsoft Sentinel field mapping.

No I/O, no clock, no environment: every function here maps values to values, so the mirror, the push back and the
three-way merge (``sync.merge``) share one definition of "the same incident state" on both sides.

The centre is :class:`SyncedFields`, a side-neutral snapshot of the synced fields in *Defender vocabulary*:

* ``status``: ``active`` | ``inProgress`` | ``resolved`` (Defender ``awaitingAction`` reads as ``inProgress``;
  ``redirected`` reads as ``resolved``/``unknown``, see :func:`from_defender`).
* ``owner``: the Defender-side identity (UPN), lower-cased. Sentinel owners go through :class:`OwnerMap`. A Defender
  ``assignedTo`` that is free text (Graph takes any text: "Automation", an app's name) is no identity: it reads as
  no owner, is never written as a Sentinel owner, and shows as the app's label ``owner:<text>``.
* ``classification`` / ``determination``: only while resolved (``None`` while open): an open Sentinel incident has no
  classification, so an open incident's classification is not a synced value. Defender keeps whatever it has.
* ``tags``: the user's tags (Defender ``customTags`` / Sentinel labels of type ``User``) less the app's own labels
  (matched exactly: a customer's tag ``Redirected`` is a tag, the app's label is ``redirected``).

Comment text (and any Defender text mirrored into a description) is data: HTML, markdown or script in it is kept
verbatim as text, never parsed, evaluated, rendered or escaped here (escaping would corrupt the text on the way back).
Rendering safety is the job of the portals that display it.

Sizes are counted in UTF-16 code units: both services are .NET, whose string lengths count UTF-16 units, so a text
with characters outside the BMP (emoji, some CJK) is cut earlier than its Python ``len`` suggests, never later.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from sync.timeutil import format_time, parse_time

Origin = Literal["defender", "sentinel"]

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------------

ACTIVE = "active"
IN_PROGRESS = "inProgress"
RESOLVED = "resolved"
STATUSES = frozenset({ACTIVE, IN_PROGRESS, RESOLVED})

TRUE_POSITIVE = "truePositive"
FALSE_POSITIVE = "falsePositive"
INFORMATIONAL_EXPECTED = "informationalExpectedActivity"
UNKNOWN = "unknown"
CLASSIFICATIONS = frozenset({TRUE_POSITIVE, FALSE_POSITIVE, INFORMATIONAL_EXPECTED, UNKNOWN})

#: Determinations Defender accepts for each classification (Defender UI / legacy API pairs; Graph metadata spellings).
VALID_DETERMINATIONS: dict[str, frozenset[str]] = {
    TRUE_POSITIVE: frozenset({"multiStagedAttack", "maliciousUserActivity", "compromisedAccount", "malware",
                              "phishing", "unwantedSoftware", "other"}),
    INFORMATIONAL_EXPECTED: frozenset({"securityTesting", "lineOfBusinessApplication", "confirmedActivity", "other"}),
    FALSE_POSITIVE: frozenset({"notMalicious", "notEnoughDataToValidate", "other"}),
    UNKNOWN: frozenset({UNKNOWN}),
}
#: Deprecated (Aug 2022) pairs still found on old incidents: accepted when read, never chosen by the app.
TOLERATED_DETERMINATIONS: dict[str, frozenset[str]] = {
    TRUE_POSITIVE: frozenset({"apt", "securityPersonnel"}),
    INFORMATIONAL_EXPECTED: frozenset(),
    FALSE_POSITIVE: frozenset(),
    UNKNOWN: frozenset(),
}
# Graph metadata enum (what PATCH accepts), minus unknownFutureValue.
_DETERMINATION_ENUM = frozenset({
    "unknown", "apt", "malware", "securityPersonnel", "securityTesting", "unwantedSoftware", "other",
    "multiStagedAttack", "compromisedAccount", "phishing", "maliciousUserActivity", "notMalicious",
    "notEnoughDataToValidate", "confirmedActivity", "lineOfBusinessApplication",
})
#: Legacy (docs page / legacy API / XSOAR) spellings read as their Graph metadata names.
LEGACY_DETERMINATIONS: dict[str, str] = {
    "compromiseduser": "compromisedAccount",
    "clean": "notMalicious",
    "insufficientdata": "notEnoughDataToValidate",
    "confirmeduseractivity": "confirmedActivity",
    "noenoughdatatovalidate": "notEnoughDataToValidate",
    "notavailable": UNKNOWN,
    "unknownfuturevalue": UNKNOWN,
}
_DETERMINATION_BY_LOWER = {d.lower(): d for d in _DETERMINATION_ENUM} | LEGACY_DETERMINATIONS
#: The two spellings Microsoft's pages give for one determination (Graph metadata name first). The app writes the
#: metadata name; when Graph refuses it (400) the other is tried once (see :func:`determination_respelled`).
DETERMINATION_SPELLINGS: tuple[tuple[str, str], ...] = (
    ("compromisedAccount", "compromisedUser"), ("notMalicious", "clean"),
    ("notEnoughDataToValidate", "insufficientData"), ("confirmedActivity", "confirmedUserActivity"),
)
_OTHER_SPELLING = {a: b for a, b in DETERMINATION_SPELLINGS} | {b: a for a, b in DETERMINATION_SPELLINGS}
_CLASSIFICATION_BY_LOWER = {c.lower(): c for c in CLASSIFICATIONS} | {"unknownfuturevalue": UNKNOWN}

_STATUS_TO_SENTINEL = {ACTIVE: "New", IN_PROGRESS: "Active", RESOLVED: "Closed"}
_STATUS_FROM_SENTINEL = {"new": ACTIVE, "active": IN_PROGRESS, "closed": RESOLVED}

#: Defender classification -> (Sentinel classification, classificationReason or None).
CLASSIFICATION_TO_SENTINEL: dict[str, tuple[str, str | None]] = {
    TRUE_POSITIVE: ("TruePositive", "SuspiciousActivity"),
    FALSE_POSITIVE: ("FalsePositive", "InaccurateData"),
    INFORMATIONAL_EXPECTED: ("BenignPositive", "SuspiciousButExpected"),
    UNKNOWN: ("Undetermined", None),
}
# Any FalsePositive reason (InaccurateData or IncorrectAlertLogic) reads as falsePositive.
_CLASSIFICATION_FROM_SENTINEL = {
    "truepositive": TRUE_POSITIVE, "falsepositive": FALSE_POSITIVE, "benignpositive": INFORMATIONAL_EXPECTED,
    "undetermined": UNKNOWN,
}

SEVERITY_TO_SENTINEL: dict[str, str] = {
    "high": "High", "medium": "Medium", "low": "Low", "informational": "Informational", "unknown": "Informational",
}

# ---------------------------------------------------------------------------------------------------------------------
# The app's own labels
# ---------------------------------------------------------------------------------------------------------------------

#: Marks every Sentinel incident this app mirrors.
SOURCE_LABEL = "defender-sync"
REDIRECTED_LABEL = "redirected"
TENANT_LABEL_PREFIX = "tenant:"
DETERMINATION_LABEL_PREFIX = "determination:"
OWNER_LABEL_PREFIX = "owner:"
#: Marks the later of two Sentinel incidents made for one Defender incident (defender-portal mode).
DUPLICATE_LABEL = "duplicate"
_APP_LABELS = frozenset({SOURCE_LABEL, REDIRECTED_LABEL, DUPLICATE_LABEL})
_APP_LABEL_PREFIXES = (TENANT_LABEL_PREFIX, DETERMINATION_LABEL_PREFIX, OWNER_LABEL_PREFIX)
#: Sentinel label names are short texts; a long free-text owner is cut to this in its ``owner:`` label.
OWNER_LABEL_LIMIT = 256
# A UPN or an e-mail address: one "@", no spaces, a dotted domain. Anything else in assignedTo is free text.
_IDENTITY = re.compile(r"^[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+$")

# ---------------------------------------------------------------------------------------------------------------------
# Size limits (UTF-16 code units)
# ---------------------------------------------------------------------------------------------------------------------

#: Sentinel comment message limit (community-documented ~30,000 characters).
SENTINEL_COMMENT_LIMIT = 30_000
#: Defender (Graph alertComment) limit: undocumented, so a conservative 10,000 that no observed comment reaches.
DEFENDER_COMMENT_LIMIT = 10_000
#: Sentinel description: no documented limit for incidents; 5,000 is the documented analytics-rule description limit.
DESCRIPTION_LIMIT = 5_000
TITLE_LIMIT = 256
CLASSIFICATION_COMMENT_LIMIT = 4_000
#: At most this many alerts are listed in a description ("and N more" after).
MAX_LISTED_ALERTS = 50
TRUNCATION_MARKER = "…[truncated]"
# Ends the closing comment the app generates, so it is regenerated (not kept as an analyst's note) when values change.
_CLOSING_COMMENT_SUFFIX = f" (synced by {SOURCE_LABEL})."
_REDIRECT_PREFIX = "Defender XDR merged incident "

# Read-only Sentinel incident properties (and playbook-trigger extras): never sent back in a PUT.
_SENTINEL_READ_ONLY = frozenset({
    "createdTimeUtc", "lastModifiedTimeUtc", "incidentNumber", "incidentUrl", "providerName", "providerIncidentId",
    "relatedAnalyticRuleIds", "additionalData", "alerts", "bookmarks", "relatedEntities", "comments",
})


# ---------------------------------------------------------------------------------------------------------------------
# Canonical snapshot
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyncedFields:
    """Side-neutral value of the synced fields, in Defender vocabulary (see the module docstring).

    Invariants (checked): ``status`` is one of ``active``/``inProgress``/``resolved``; classification and
    determination are both set while resolved and both ``None`` otherwise; ``owner`` is lower-case or ``None``.
    """

    status: str
    owner: str | None
    classification: str | None
    determination: str | None
    tags: frozenset[str]

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, got {self.status!r}")
        if self.status == RESOLVED:
            if self.classification not in CLASSIFICATIONS or not self.determination:
                raise ValueError("a resolved incident needs a classification and a determination, got "
                                 f"{self.classification!r}/{self.determination!r}")
        elif self.classification is not None or self.determination is not None:
            raise ValueError(f"classification/determination only exist while resolved (status {self.status!r})")
        if self.owner is not None and (not self.owner or self.owner != self.owner.lower()):
            raise ValueError(f"owner must be a non-empty lower-case identity or None, got {self.owner!r}")
        if not isinstance(self.tags, frozenset):
            raise ValueError("tags must be a frozenset")


def canonical_owner(value: object) -> str | None:
    """Owner identity as compared by the sync: stripped, lower-cased; empty or non-string is no owner."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    return text or None


def is_identity(value: object) -> bool:
    """Whether an owner value looks like a UPN or an e-mail address (``name@domain.tld``), the only owners that
    mean the same person on both sides."""
    return isinstance(value, str) and _IDENTITY.match(value.strip()) is not None


def defender_owner(assigned_to: object) -> str | None:
    """The canonical owner of a Defender ``assignedTo``: its identity, or ``None`` for free text (see
    :func:`owner_text`)."""
    return canonical_owner(assigned_to) if is_identity(assigned_to) else None


def owner_text(assigned_to: object) -> str | None:
    """A free-text ``assignedTo`` ("Automation", "Cortex XSOAR MS Graph Dev"), one line; ``None`` for an identity or
    no owner."""
    if not isinstance(assigned_to, str) or not assigned_to.strip() or is_identity(assigned_to):
        return None
    return " ".join(assigned_to.split())


class OwnerMap:
    """Bidirectional, case-insensitive owner translation built from ``SYNC_OWNER_MAP``.

    The setting's keys are **Sentinel-side** identities and its values **Defender-side** ones:
    ``{"analyst@mssp.com": "analyst@customer.com"}`` means the MSSP analyst ``analyst@mssp.com`` who owns an incident in
    the central Sentinel workspace is ``analyst@customer.com`` in the customer's Defender tenant. Identities not in the
    map pass through unchanged. The map must be one-to-one (``ValueError`` otherwise) so a change can flow back.

    Limitation: a Defender owner that is itself a *key* of the map but not a value (a Defender user named like a
    Sentinel-side alias) cannot be represented in Sentinel: it is written as-is and reads back translated.
    """

    def __init__(self, sentinel_to_defender: Mapping[str, str] | None = None) -> None:
        forward: dict[str, str] = {}
        for key, value in (sentinel_to_defender or {}).items():
            k, v = canonical_owner(key), canonical_owner(value)
            if k is None or v is None:
                raise ValueError(f"SYNC_OWNER_MAP entries must be non-empty identities, got {key!r}: {value!r}")
            forward[k] = v
        reverse = {v: k for k, v in forward.items()}
        if len(reverse) != len(forward):
            raise ValueError("SYNC_OWNER_MAP maps two Sentinel identities to the same Defender identity")
        self._to_defender = forward
        self._to_sentinel = reverse

    def to_defender(self, sentinel_identity: object) -> str | None:
        """Canonical (Defender-side, lower-case) owner for a Sentinel-side identity."""
        owner = canonical_owner(sentinel_identity)
        return None if owner is None else self._to_defender.get(owner, owner)

    def to_sentinel(self, defender_identity: object) -> str | None:
        """Sentinel-side identity (lower-case) for a Defender-side owner."""
        owner = canonical_owner(defender_identity)
        return None if owner is None else self._to_sentinel.get(owner, owner)

    def __len__(self) -> int:
        return len(self._to_defender)

    def __repr__(self) -> str:
        return f"OwnerMap({self._to_defender!r})"


# ---------------------------------------------------------------------------------------------------------------------
# Enum helpers
# ---------------------------------------------------------------------------------------------------------------------

def normalize_classification(value: object) -> str:
    """Defender classification in Graph camelCase; missing, ``unknownFutureValue`` or unrecognised is ``unknown``."""
    if isinstance(value, str):
        return _CLASSIFICATION_BY_LOWER.get(value.strip().lower(), UNKNOWN)
    return UNKNOWN


def normalize_determination(value: object) -> str:
    """Defender determination in Graph metadata spelling; legacy names mapped, missing is ``unknown``.

    An unrecognised non-empty value (a newer enum member) is kept verbatim: it is Defender's value, not ours to change.
    """
    if not isinstance(value, str) or not value.strip():
        return UNKNOWN
    text = value.strip()
    return _DETERMINATION_BY_LOWER.get(text.lower(), text)


def is_valid_determination(classification: str, determination: str, *, tolerate_deprecated: bool = False) -> bool:
    """Whether Defender accepts ``determination`` with ``classification`` (deprecated pairs only when tolerated)."""
    if determination in VALID_DETERMINATIONS.get(classification, frozenset()):
        return True
    return tolerate_deprecated and determination in TOLERATED_DETERMINATIONS.get(classification, frozenset())


def default_determination(classification: str) -> str:
    """Determination used when nothing better is known: ``unknown`` for ``unknown``, else ``other``."""
    return UNKNOWN if classification == UNKNOWN else "other"


def sentinel_severity(defender_severity: object) -> str:
    """Sentinel severity for a Defender severity (``unknown``, missing and future values are ``Informational``)."""
    if isinstance(defender_severity, str):
        return SEVERITY_TO_SENTINEL.get(defender_severity.strip().lower(), "Informational")
    return "Informational"


def sentinel_status(status: str) -> str:
    """Sentinel status (``New``/``Active``/``Closed``) for a canonical status."""
    return _STATUS_TO_SENTINEL[status]


def is_redirected(incident: Mapping[str, Any]) -> bool:
    """Whether Defender merged this incident into another (status ``redirected``).

    Callers merge such an incident with ``defender_writable=False``: it is terminal in Defender.
    """
    status = incident.get("status")
    return isinstance(status, str) and status.strip().lower() == "redirected"


# ---------------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------------

def is_app_label(name: str) -> bool:
    """Whether a label/tag name is one of the app's own, matched exactly (``redirected``, ``duplicate``, the source
    label, ``tenant:…``, ``determination:…``, ``owner:…``): never a user tag on either side. A customer's own tag
    spelled otherwise (``Redirected``, ``Owner:x``) is a tag like any other and syncs."""
    return name in _APP_LABELS or name.startswith(_APP_LABEL_PREFIXES)


def owner_label(text: str) -> str:
    """The ``owner:<text>`` label showing a free-text Defender owner in Sentinel."""
    return cut_text(f"{OWNER_LABEL_PREFIX}{text}", OWNER_LABEL_LIMIT, "…")


def tenant_label(tenant_name: str) -> str:
    """The ``tenant:<name>`` label."""
    return f"{TENANT_LABEL_PREFIX}{tenant_name}"


def determination_label(determination: str) -> str:
    """The ``determination:<value>`` label."""
    return f"{DETERMINATION_LABEL_PREFIX}{determination}"


def _label_name(label: object) -> str | None:
    if isinstance(label, Mapping):
        name = label.get("labelName")
        if isinstance(name, str) and name.strip():
            return name
    return None


def _is_user_label(label: Mapping[str, Any]) -> bool:
    kind = label.get("labelType")
    return kind is None or (isinstance(kind, str) and kind.lower() == "user")


def user_tags_from_labels(labels: object, *, known_tags: Iterable[str] = ()) -> frozenset[str]:
    """User tags in Sentinel labels: labels of type ``User`` (or untyped) less the app's own labels.

    Sentinel keeps one label per name, and a name an automation rule assigned stays ``AutoAssigned`` even when the app
    writes it as a user tag. So an ``AutoAssigned`` label also counts as a tag when its name is in ``known_tags`` (the
    tag as known from the base or from Defender): it can neither add a tag nor make one look removed.
    """
    if not isinstance(labels, list):
        return frozenset()
    known = frozenset(known_tags)
    tags = set()
    for label in labels:
        name = _label_name(label)
        if (name is not None and isinstance(label, Mapping) and not is_app_label(name)
                and (_is_user_label(label) or name in known)):
            tags.add(name)
    return frozenset(tags)


def _user_tags_from_custom_tags(custom_tags: object) -> frozenset[str]:
    if not isinstance(custom_tags, list):
        return frozenset()
    return frozenset(t for t in custom_tags if isinstance(t, str) and t.strip() and not is_app_label(t))


# ---------------------------------------------------------------------------------------------------------------------
# Defender -> canonical -> Defender
# ---------------------------------------------------------------------------------------------------------------------

def _defender_status(value: object) -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    if text in ("", "active"):
        return ACTIVE
    if text in ("resolved", "redirected"):
        return RESOLVED
    # inProgress, awaitingAction, and unknownFutureValue (how awaitingAction reads without the Prefer header) are all
    # "someone is on it": an open state that is not new.
    return IN_PROGRESS


def from_defender(incident: Mapping[str, Any]) -> SyncedFields:
    """Canonical synced fields of a Graph security incident.

    ``redirected`` reads as resolved/unknown/unknown (Sentinel shows it Closed/Undetermined); ``awaitingAction`` and
    ``unknownFutureValue`` read as ``inProgress``. An open incident's classification is dropped (not synced).
    """
    status = _defender_status(incident.get("status"))
    classification: str | None = None
    determination: str | None = None
    if is_redirected(incident):
        classification, determination = UNKNOWN, UNKNOWN
    elif status == RESOLVED:
        classification = normalize_classification(incident.get("classification"))
        determination = normalize_determination(incident.get("determination"))
    return SyncedFields(
        status=status,
        owner=defender_owner(incident.get("assignedTo")),
        classification=classification,
        determination=determination,
        tags=_user_tags_from_custom_tags(incident.get("customTags")),
    )


def to_defender_patch(fields: SyncedFields, current_defender: Mapping[str, Any], *,
                      closing_comment: str | None = None) -> dict[str, Any]:
    """Graph PATCH body that makes ``current_defender`` show ``fields``; ``{}`` when nothing differs.

    Status is written as ``active``/``inProgress``/``resolved`` only (never ``redirected``/``awaitingAction``; an
    ``awaitingAction`` incident already reads as ``inProgress`` and is left alone). Classification and determination
    are written together and only for a resolved incident; reopening leaves Defender's classification alone.
    ``assignedTo`` is the owner (``None`` unassigns). ``customTags`` is the full list (PATCH replaces the collection):
    the current order is kept, new tags appended sorted, and any app-label-shaped tag Defender has is kept.
    ``closing_comment`` (Sentinel's analyst-written ``classificationComment``, see :func:`sentinel_closing_comment`)
    becomes ``resolvingComment`` when this patch writes the closure, or when Defender is resolved with no comment of
    its own; it never replaces a comment Defender has for the same closure.
    A redirected (merged) incident is terminal: the patch is always empty.
    """
    if is_redirected(current_defender):
        return {}
    current = from_defender(current_defender)
    patch: dict[str, Any] = {}
    if fields.status != current.status:
        patch["status"] = fields.status
    if fields.status == RESOLVED:
        assert fields.classification is not None and fields.determination is not None
        reclassified = (normalize_classification(current_defender.get("classification")) != fields.classification
                        or normalize_determination(current_defender.get("determination")) != fields.determination)
        if "status" in patch or reclassified:
            patch["classification"] = fields.classification
            patch["determination"] = fields.determination
        current_comment = current_defender.get("resolvingComment")
        if closing_comment and closing_comment != current_comment and (
                "classification" in patch or not (isinstance(current_comment, str) and current_comment.strip())):
            patch["resolvingComment"] = cut_text(closing_comment, CLASSIFICATION_COMMENT_LIMIT)
    if fields.owner != current.owner:
        patch["assignedTo"] = fields.owner
    if fields.tags != current.tags:
        raw = current_defender.get("customTags")
        existing = [t for t in raw if isinstance(t, str)] if isinstance(raw, list) else []
        kept = [t for t in existing if t in fields.tags or (t.strip() and is_app_label(t))]
        patch["customTags"] = _dedupe(kept + sorted(fields.tags - set(kept)))
    return patch


def determination_respelled(patch: Mapping[str, Any]) -> dict[str, Any] | None:
    """The PATCH to retry with when Graph refuses a determination spelling (400): the same with the other spelling
    (``compromisedAccount`` <-> ``compromisedUser``, ...); ``None`` when the patch has no such determination."""
    other = _OTHER_SPELLING.get(str(patch.get("determination")))
    return {**patch, "determination": other} if other is not None else None


def in_progress_fallback(patch: Mapping[str, Any]) -> dict[str, Any]:
    """The PATCH to retry with when Graph refuses ``inProgress`` (not in its documented PATCH values): ``active``."""
    return {**patch, "status": ACTIVE} if patch.get("status") == IN_PROGRESS else dict(patch)


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------------------------------
# Sentinel -> canonical
# ---------------------------------------------------------------------------------------------------------------------

def sentinel_closing_comment(properties: Mapping[str, Any]) -> str | None:
    """The closing comment an analyst wrote on a closed Sentinel incident (``classificationComment``); ``None`` when
    open, empty, or the app's own text (the generated "Closed as …" line or a redirect note)."""
    comment = properties.get("classificationComment")
    status = properties.get("status")
    if (not isinstance(status, str) or status.strip().lower() != "closed" or not isinstance(comment, str)
            or not comment.strip() or comment.endswith(_CLOSING_COMMENT_SUFFIX)
            or comment.startswith(_REDIRECT_PREFIX)):
        return None
    return comment


def sentinel_owner_identity(owner: object) -> str | None:
    """The identity in a Sentinel owner object (``userPrincipalName``, else ``email``), lower-cased.

    ``assignedTo`` (a display name) and ``objectId`` are not identities Defender can take: an owner with neither UPN
    nor email (e.g. a group) reads as no owner, and is left in place by :func:`to_sentinel_properties`.
    """
    if not isinstance(owner, Mapping):
        return None
    for key in ("userPrincipalName", "email"):
        identity = canonical_owner(owner.get(key))
        if identity is not None:
            return identity
    return None


def from_sentinel(properties: Mapping[str, Any], *, owner_map: OwnerMap, base: SyncedFields | None,
                  defender: Mapping[str, Any] | None = None) -> tuple[SyncedFields, list[str]]:
    """Canonical synced fields of a Sentinel incident's ``properties``, and the problems to report.

    Closed incidents get their determination from, in order:

    1. a ``determination:<value>`` label valid for the classification (deprecated values tolerated, and the value of
       an unchanged closure always accepted since the app wrote it); an invalid label is ignored and reported, except
       a stale label the app wrote for the previous classification (``base``), which is ignored silently; several
       valid labels are reported, and the one that differs from ``base`` (the analyst's: the app's label shows the
       base) is used, else the first sorted (label order is not relied on; see :func:`sentinel_labels_stale`);
    2. an unchanged closure: ``base`` resolved with the same classification keeps its determination;
    3. Defender's own determination (``defender``, the raw Graph incident): kept as-is when Defender is resolved with
       the same classification (the same closure), else kept when valid for the new classification (Defender keeps
       its determination while reopened, so a Sentinel re-close does not lose it);
    4. ``base``'s determination if valid for the new classification;
    5. ``other`` (``unknown`` for classification ``unknown``).
    """
    problems: list[str] = []
    raw_status = properties.get("status")
    status = _STATUS_FROM_SENTINEL.get(raw_status.strip().lower()) if isinstance(raw_status, str) else None
    classification: str | None = None
    determination: str | None = None
    labels = properties.get("labels")
    if status is None:
        # Unreadable status: treat the closure as unchanged (never reopen or close anything on a value we can't read).
        problems.append(f"unknown Sentinel status {raw_status!r}; closure read as unchanged")
        status = base.status if base is not None else ACTIVE
        if base is not None:
            classification, determination = base.classification, base.determination
    elif status == RESOLVED:
        raw_cls = properties.get("classification")
        cls = _CLASSIFICATION_FROM_SENTINEL.get(raw_cls.strip().lower()) if isinstance(raw_cls, str) else None
        if cls is None:
            if raw_cls not in (None, ""):
                problems.append(f"unknown Sentinel classification {raw_cls!r}; read as Undetermined")
            cls = UNKNOWN
        classification = cls
        determination = _sentinel_determination(cls, labels, base, defender, problems)
    fields = SyncedFields(
        status=status,
        owner=owner_map.to_defender(sentinel_owner_identity(properties.get("owner"))),
        classification=classification,
        determination=determination,
        tags=user_tags_from_labels(labels, known_tags=_known_tags(base, defender)),
    )
    return fields, problems


def _known_tags(base: SyncedFields | None, defender: Mapping[str, Any] | None) -> frozenset[str]:
    known = base.tags if base is not None else frozenset()
    if defender is not None:
        known = known | _user_tags_from_custom_tags(defender.get("customTags"))
    return known


def _determination_labels(labels: object) -> list[tuple[str, str]]:
    """(raw label name, normalised value) for every ``determination:<value>`` label, any label type."""
    found: list[tuple[str, str]] = []
    if isinstance(labels, list):
        for label in labels:
            name = _label_name(label)
            if name is not None and name.startswith(DETERMINATION_LABEL_PREFIX):
                found.append((name, normalize_determination(name[len(DETERMINATION_LABEL_PREFIX):])))
    return found


def _sentinel_determination(cls: str, labels: object, base: SyncedFields | None,
                            defender: Mapping[str, Any] | None, problems: list[str]) -> str:
    base_det = base.determination if base is not None and base.status == RESOLVED else None
    # The determination of an unchanged closure (same classification as before, or as Defender has now): its value is
    # accepted whatever it is, since it came from Defender, not from an analyst's label.
    same_closure: str | None = None
    if base is not None and base.status == RESOLVED and base.classification == cls:
        same_closure = base.determination
    defender_now = from_defender(defender) if defender is not None else None
    defender_same: str | None = None
    if defender_now is not None and defender_now.status == RESOLVED and defender_now.classification == cls:
        defender_same = defender_now.determination

    valid: set[str] = set()
    for name, value in _determination_labels(labels):
        if (is_valid_determination(cls, value, tolerate_deprecated=True)
                or value in (same_closure, defender_same)):
            valid.add(value)
        elif value != base_det:  # a label the app wrote for an earlier classification is stale, not an error
            problems.append(f"ignored label {name!r}: not a valid determination for classification {cls!r} "
                            f"(valid: {', '.join(sorted(VALID_DETERMINATIONS[cls]))})")
    if len(valid) == 1:
        return valid.pop()
    if valid:
        # Sentinel's label order is not a promise, and which label came last is unknowable: the analyst's label is
        # the one that differs from the last synced value (the app's label shows that value); else sorted first.
        changed = sorted(valid - {base_det}) if base_det is not None else sorted(valid)
        chosen = (changed or sorted(valid))[0]
        problems.append(f"several determination labels ({', '.join(sorted(valid))}): used {chosen!r}; remove the "
                        "others to choose another")
        return chosen
    if same_closure is not None:
        return same_closure
    if defender_same is not None:
        return defender_same
    if defender is not None:
        # Open (or classified differently) in Defender: Defender still holds its last determination.
        defender_det = normalize_determination(defender.get("determination"))
        if is_valid_determination(cls, defender_det):
            return defender_det
    if base_det is not None and is_valid_determination(cls, base_det):
        return base_det
    return default_determination(cls)


# ---------------------------------------------------------------------------------------------------------------------
# Canonical -> Sentinel
# ---------------------------------------------------------------------------------------------------------------------

def to_sentinel_properties(incident: Mapping[str, Any], fields: SyncedFields, current: Mapping[str, Any] | None, *,
                           owner_map: OwnerMap, tenant_name: str,
                           alerts: Sequence[Mapping[str, Any]] | None = None,
                           surviving_sentinel_url: str | None = None) -> dict[str, Any]:
    """Full Sentinel incident ``properties`` for a PUT (a PUT replaces the incident, so nothing is left implicit).

    ``incident`` is the Defender incident (Defender-owned fields: title, description, severity, link); ``fields`` the
    merged synced values; ``current`` the Sentinel incident's current properties (``None`` when creating). Fields the
    app does not own are carried over from ``current`` (first/last activity times, AutoAssigned labels, ...) and
    read-only ones dropped. The owner object (with its ``objectId``) is kept while it is the same person; an analyst's
    ``IncorrectAlertLogic`` reason and closing comment are kept while the classification is unchanged.
    ``alerts`` defaults to ``incident["alerts"]`` (``$expand=alerts``).
    """
    current = current or {}
    props: dict[str, Any] = {k: v for k, v in current.items() if k not in _SENTINEL_READ_ONLY}
    redirected = is_redirected(incident)
    alert_list = list(alerts) if alerts is not None else _alerts_of(incident)

    props["title"] = cut_text(_title(incident), TITLE_LIMIT, "…")
    props["description"] = sentinel_description(incident, alert_list)
    props["severity"] = sentinel_severity(incident.get("severity"))
    props["status"] = sentinel_status(fields.status)

    for key in ("classification", "classificationReason", "classificationComment"):
        props.pop(key, None)
    if fields.status == RESOLVED:
        assert fields.classification is not None
        sentinel_cls, reason = CLASSIFICATION_TO_SENTINEL[fields.classification]
        same_cls = (str(current.get("status", "")).lower() == "closed"
                    and str(current.get("classification", "")).lower() == sentinel_cls.lower())
        props["classification"] = sentinel_cls
        if reason is not None:
            current_reason = current.get("classificationReason")
            keep_reason = (same_cls and sentinel_cls == "FalsePositive"
                           and str(current_reason).lower() == "incorrectalertlogic")
            props["classificationReason"] = "IncorrectAlertLogic" if keep_reason else reason
        current_comment = current.get("classificationComment")
        if redirected:
            comment = redirect_comment(incident, surviving_sentinel_url=surviving_sentinel_url) or ""
        elif (same_cls and isinstance(current_comment, str) and current_comment.strip()
              and not current_comment.endswith(_CLOSING_COMMENT_SUFFIX)):
            comment = current_comment  # the analyst's closing note
        else:
            comment = _closing_comment(incident, fields)
        props["classificationComment"] = cut_text(comment, CLASSIFICATION_COMMENT_LIMIT)

    owner_identity = owner_map.to_sentinel(fields.owner)
    current_owner = current.get("owner")
    props.pop("owner", None)
    if isinstance(current_owner, Mapping) and owner_map.to_defender(
            sentinel_owner_identity(current_owner)) == fields.owner:
        # Same person (objectId, display name kept), or, with no owner, an owner object that reads as none (a group
        # without an email): such an owner cannot be expressed in Defender and is not ours to remove.
        props["owner"] = dict(current_owner)
    elif owner_identity is not None:
        props["owner"] = {"userPrincipalName": owner_identity, "email": owner_identity, "ownerType": "User"}

    props["labels"] = _labels(fields, current.get("labels"), tenant_name, redirected,
                              owner_text(incident.get("assignedTo")))

    # Activity window: widened by the alerts' times, never narrowed (min/max keep it stable across rewrites).
    first, last = _activity_window(alert_list)
    for key, value, earliest in (("firstActivityTimeUtc", first, True), ("lastActivityTimeUtc", last, False)):
        if value is not None:
            props[key] = _widen(props.get(key), value, earliest=earliest)
    return props


def _widen(current: object, candidate: str, *, earliest: bool) -> object:
    if not isinstance(current, str):
        return candidate
    try:
        now, new = parse_time(current), parse_time(candidate)
    except ValueError:
        return current
    return candidate if (new < now if earliest else new > now) else current


def _alerts_of(incident: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = incident.get("alerts")
    return [a for a in raw if isinstance(a, Mapping)] if isinstance(raw, list) else []


def _title(incident: Mapping[str, Any]) -> str:
    name = incident.get("displayName")
    if isinstance(name, str) and name.strip():
        return _one_line(name)
    return f"Defender XDR incident {incident.get('id', '')}".strip()


def _closing_comment(incident: Mapping[str, Any], fields: SyncedFields) -> str:
    resolving = incident.get("resolvingComment")
    if (isinstance(resolving, str) and resolving.strip()
            and normalize_classification(incident.get("classification")) == fields.classification):
        return resolving
    return f"Closed as {fields.classification} / {fields.determination}{_CLOSING_COMMENT_SUFFIX}"


def app_labels(fields: SyncedFields, *, tenant_name: str, redirected: bool,
               free_text_owner: str | None = None) -> list[str]:
    """The app's own labels for an incident: source, tenant, ``redirected``, ``owner:<text>`` (Defender's free-text
    ``assignedTo`` while no identity owns the incident), ``determination:<value>`` (closed)."""
    app = [SOURCE_LABEL, tenant_label(tenant_name)]
    if redirected:
        app.append(REDIRECTED_LABEL)
    if free_text_owner and fields.owner is None:
        app.append(owner_label(free_text_owner))
    if fields.status == RESOLVED and fields.determination not in (None, UNKNOWN):
        assert fields.determination is not None
        app.append(determination_label(fields.determination))
    return app


def sentinel_labels_stale(properties: Mapping[str, Any], fields: SyncedFields, *, tenant_name: str,
                          redirected: bool, free_text_owner: str | None = None) -> bool:
    """Whether the app's own labels on a Sentinel incident differ from what the app would write for ``fields``.

    The merge compares synced *values*: after an analyst adds a second ``determination:`` label, or reclassifies
    while the old one stays, Sentinel already reads as the merged value, so the merge asks for no Sentinel write, but
    the labels still show the old value. A caller that sees ``True`` here PUTs anyway (one write that repairs them);
    afterwards this is ``False``, so it cannot cause repeated writes.
    """
    labels = properties.get("labels")
    names = [_label_name(label) for label in labels] if isinstance(labels, list) else []
    present = sorted(name for name in names if name is not None and is_app_label(name))
    return present != sorted(app_labels(fields, tenant_name=tenant_name, redirected=redirected,
                                        free_text_owner=free_text_owner))


def _labels(fields: SyncedFields, current_labels: object, tenant_name: str, redirected: bool,
            free_text_owner: str | None) -> list[dict[str, str]]:
    # AutoAssigned labels belong to automation rules: carried over as they are, in their order. Sentinel keeps one
    # label per name, so a user tag or app label of the same name is not written twice.
    # The app's own labels are regenerated whatever their type: an automation rule's stale ``determination:`` label
    # carried over would be read as a change on the next sync.
    auto: list[dict[str, str]] = []
    if isinstance(current_labels, list):
        for label in current_labels:
            name = _label_name(label)
            if (name is not None and isinstance(label, Mapping) and not _is_user_label(label)
                    and not is_app_label(name)):
                auto.append({"labelName": name, "labelType": str(label.get("labelType"))})
    taken = {label["labelName"] for label in auto}
    user = [name for name in sorted(fields.tags) if name not in taken]
    app = [name for name in app_labels(fields, tenant_name=tenant_name, redirected=redirected,
                                       free_text_owner=free_text_owner) if name not in taken]
    labels = [{"labelName": name, "labelType": "User"} for name in user] + auto
    labels.extend({"labelName": name, "labelType": "User"} for name in app)
    return labels


def _activity_window(alerts: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    firsts: list[tuple[Any, str]] = []
    lasts: list[tuple[Any, str]] = []
    for alert in alerts:
        for key, bucket in (("firstActivityDateTime", firsts), ("lastActivityDateTime", lasts)):
            value = alert.get(key)
            if isinstance(value, str):
                try:
                    bucket.append((parse_time(value), value))
                except ValueError:
                    continue
    first = min(firsts)[1] if firsts else None
    last = max(lasts)[1] if lasts else None
    return first, last


def _one_line(text: str) -> str:
    return " ".join(text.split())


def sentinel_description(incident: Mapping[str, Any], alerts: Sequence[Mapping[str, Any]] | None = None, *,
                         limit: int = DESCRIPTION_LIMIT) -> str:
    """Sentinel description: the Defender portal link, Defender's description, and a bounded alert list.

    The link always survives; the alert list (title, severity, status per alert, sorted by creation time then ID so
    the text is stable) stops with "and N more" at ``MAX_LISTED_ALERTS`` or when the size budget is spent; Defender's
    own description gets what is left and is cut with a marker. The result is at most ``limit`` UTF-16 units.
    """
    alert_list = list(alerts) if alerts is not None else _alerts_of(incident)
    incident_id = incident.get("id", "")
    url = incident.get("incidentWebUrl")
    header = f"Defender XDR incident {incident_id}"
    if isinstance(url, str) and url.strip():
        header += f": {url.strip()}"
    header = cut_text(header, max(limit // 4, 64), "…")
    parts = [header]
    if is_redirected(incident):
        text = redirect_comment(incident)
        if text:
            parts.append(cut_text(text, max(limit // 4, 64), "…"))

    ordered = sorted(alert_list, key=lambda a: (str(a.get("createdDateTime") or ""), str(a.get("id") or "")))
    alert_budget = (limit * 3) // 5
    lines = [f"Alerts ({len(ordered)}):"] if ordered else []
    used = utf16_len(lines[0]) + 1 if lines else 0
    for index, alert in enumerate(ordered):
        remaining = len(ordered) - index
        title = cut_text(_one_line(str(alert.get("title") or alert.get("id") or "untitled alert")), 200, "…")
        line = f"- {title} (severity: {alert.get('severity') or 'unknown'}, status: {alert.get('status') or 'unknown'})"
        more = f"- and {remaining} more"
        tail = 0 if remaining == 1 else utf16_len(more) + 1
        if index >= MAX_LISTED_ALERTS or used + utf16_len(line) + 1 + tail > alert_budget:
            lines.append(more)
            break
        lines.append(line)
        used += utf16_len(line) + 1
    alert_text = "\n".join(lines)

    fixed = "\n\n".join([*parts, alert_text] if alert_text else parts)
    description = incident.get("description") or incident.get("summary")
    if isinstance(description, str) and description.strip():
        room = limit - utf16_len(fixed) - 4
        if room > utf16_len(TRUNCATION_MARKER) + 16:
            parts.append(cut_text(description.strip(), room))
    if alert_text:
        parts.append(alert_text)
    return cut_text("\n\n".join(parts), limit)


# ---------------------------------------------------------------------------------------------------------------------
# Redirected (merged) incidents
# ---------------------------------------------------------------------------------------------------------------------

def surviving_incident_url(incident: Mapping[str, Any]) -> str | None:
    """Defender portal link of the incident this one was merged into (``None`` unless redirected)."""
    target = incident.get("redirectIncidentId")
    if not is_redirected(incident) or target in (None, ""):
        return None
    target_id = str(target)
    url = incident.get("incidentWebUrl")
    if isinstance(url, str) and url.strip():
        parts = urlsplit(url.strip())
        segments = parts.path.split("/")
        if len(segments) >= 2 and segments[-2].lower() == "incidents":
            segments[-1] = target_id
            return urlunsplit(parts._replace(path="/".join(segments)))
    tenant = incident.get("tenantId")
    query = f"?tid={tenant}" if isinstance(tenant, str) and tenant else ""
    return f"https://security.microsoft.com/incidents/{target_id}{query}"


def redirect_comment(incident: Mapping[str, Any], *, surviving_sentinel_url: str | None = None) -> str | None:
    """Comment text for a redirected incident, linking the surviving one (``None`` unless redirected)."""
    if not is_redirected(incident):
        return None
    target = incident.get("redirectIncidentId")
    if target in (None, ""):
        return f"{_REDIRECT_PREFIX}{incident.get('id', '')} into another incident; closed as Undetermined."
    text = (f"{_REDIRECT_PREFIX}{incident.get('id', '')} into incident {target}: "
            f"{surviving_incident_url(incident)}")
    if surviving_sentinel_url:
        text += f" (Sentinel: {surviving_sentinel_url})"
    return text + ". Closed as Undetermined."


def redirect_comment_id(incident: Mapping[str, Any]) -> str:
    """Deterministic Sentinel comment ID (GUID) of the redirect comment: posting it twice is a no-op."""
    key = _digest("redirect", str(incident.get("tenantId", "")), str(incident.get("id", "")),
                  str(incident.get("redirectIncidentId", "")))
    return comment_guid(key)


def redirect_sentinel_comment(incident: Mapping[str, Any], *,
                              surviving_sentinel_url: str | None = None) -> tuple[str, str] | None:
    """``(comment ID, message)`` to PUT on the losing Sentinel incident (``None`` unless redirected).

    The message carries the Defender origin marker, so the push back never copies it to Defender.
    """
    text = redirect_comment(incident, surviving_sentinel_url=surviving_sentinel_url)
    if text is None:
        return None
    return redirect_comment_id(incident), mirrored_comment_text("defender", "Defender XDR", "", text)


# ---------------------------------------------------------------------------------------------------------------------
# Text size helpers
# ---------------------------------------------------------------------------------------------------------------------

def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (how .NET services count characters)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _joins_previous(ch: str) -> bool:
    # Combining marks, ZWJ, variation selectors and emoji skin-tone modifiers belong to the preceding character.
    code = ord(ch)
    return (unicodedata.combining(ch) != 0 or code == 0x200D or 0xFE00 <= code <= 0xFE0F
            or 0x1F3FB <= code <= 0x1F3FF or 0xE0100 <= code <= 0xE01EF)


def cut_text(text: str, limit: int, marker: str = TRUNCATION_MARKER) -> str:
    """``text`` unchanged if it fits in ``limit`` UTF-16 units, else cut (not inside a character or a combining
    sequence) and ended with ``marker`` so that the result fits."""
    if utf16_len(text) <= limit:
        return text
    budget = limit - utf16_len(marker)
    if budget <= 0:
        return marker[:max(limit, 0)]
    used = 0
    end = 0  # first character left out
    while end < len(text):
        width = 2 if ord(text[end]) > 0xFFFF else 1
        if used + width > budget:
            break
        used += width
        end += 1
    while end > 0 and (_joins_previous(text[end]) or text[end - 1] == "\u200d"):
        end -= 1
    return text[:end] + marker


# ---------------------------------------------------------------------------------------------------------------------
# Comments
# ---------------------------------------------------------------------------------------------------------------------

_ORIGIN_NAMES: dict[str, str] = {"defender": "Defender XDR", "sentinel": "Microsoft Sentinel"}
_COMMENT_NAMESPACE = uuid.UUID("4f6b1c52-5d0e-4b8e-9a55-2f0d8c1e7a31")
_MARKER = re.compile(
    r"^\s*(?:<[^<>]{0,200}>\s*)*\[Synced from (Defender XDR|Microsoft Sentinel)(?: · [^\n]*?)? · ref:([0-9a-f]{32})\]")
_AUTHOR_LIMIT = 128


@dataclass(frozen=True)
class CommentParts:
    """Author, creation time (wire string) and text of a comment on either side."""

    author: str
    created: str
    text: str


def defender_comment_parts(comment: Mapping[str, Any]) -> CommentParts:
    """Parts of a Graph ``alertComment`` (typed keys, or the docs example's legacy ``createdBy``/``createdTime``)."""
    author = comment.get("createdByDisplayName") or comment.get("createdBy") or ""
    created = comment.get("createdDateTime") or comment.get("createdTime") or ""
    text = comment.get("comment") or ""
    return CommentParts(str(author), str(created), str(text))


def sentinel_comment_parts(comment: Mapping[str, Any]) -> CommentParts:
    """Parts of a Sentinel incident comment resource (``{name, properties: {message, author, createdTimeUtc}}``)."""
    nested = comment.get("properties")
    props: Mapping[str, Any] = nested if isinstance(nested, Mapping) else comment
    author_obj = props.get("author")
    author = ""
    if isinstance(author_obj, Mapping):
        author = str(author_obj.get("name") or author_obj.get("userPrincipalName") or author_obj.get("email") or "")
    return CommentParts(author, str(props.get("createdTimeUtc") or ""), str(props.get("message") or ""))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:32]


def _normal_time(created: str) -> str:
    try:
        return format_time(parse_time(created))
    except ValueError:
        return created.strip()


def comment_key(origin: Origin, author: str, created: str, text: str) -> str:
    """Stable identity (32 hex chars) of a source comment: the same comment always gives the same key.

    Times are normalised (Graph's 7 fractional digits and ARM's formats compare equal), so re-reading a comment can
    never make it look new. Two comments by one author at the same microsecond with the same text are one comment.
    """
    return _digest(origin, author.strip(), _normal_time(created), text)


def comment_guid(key: str) -> str:
    """Sentinel comment ID (a GUID) derived from a comment key: a retried PUT overwrites instead of duplicating."""
    return str(uuid.uuid5(_COMMENT_NAMESPACE, key))


def comment_marker(origin: Origin, author: str, created: str, key: str) -> str:
    """Origin marker line put before a mirrored comment, e.g. ``[Synced from Defender XDR · Jane · 2024-… · ref:…]``."""
    who = cut_text(_one_line(author).replace("[", "(").replace("]", ")"), _AUTHOR_LIMIT, "…") or "unknown"
    when = cut_text(_one_line(created).replace("[", "(").replace("]", ")"), 40, "…")
    return f"[Synced from {_ORIGIN_NAMES[origin]} · {who}{f' · {when}' if when else ''} · ref:{key}]"


def comment_limit_for(origin: Origin) -> int:
    """Size limit of the side a comment from ``origin`` is copied *to*."""
    return SENTINEL_COMMENT_LIMIT if origin == "defender" else DEFENDER_COMMENT_LIMIT


def mirrored_comment_text(origin: Origin, author: str, created: str, text: str, limit: int | None = None) -> str:
    """The text to post on the other side for a comment from ``origin``: the marker line, then the text verbatim,
    cut to ``limit`` UTF-16 units (default: the target side's limit) with ``…[truncated]``."""
    limit = comment_limit_for(origin) if limit is None else limit
    marker = comment_marker(origin, author, created, comment_key(origin, author, created, text)) + "\n"
    if limit < utf16_len(marker) + utf16_len(TRUNCATION_MARKER) + 1:
        raise ValueError(f"comment limit {limit} leaves no room for the text")
    return marker + cut_text(text, limit - utf16_len(marker))


def is_mirrored_comment(text: str) -> Origin | None:
    """Origin of a comment the app copied (``"defender"``/``"sentinel"``), ``None`` for a native comment.

    A comment copied from Defender must never be copied back to Defender, and vice versa.
    """
    match = _MARKER.match(text)
    if match is None:
        return None
    return "defender" if match.group(1) == "Defender XDR" else "sentinel"


def mirrored_comment_key(text: str) -> str | None:
    """The source comment's key embedded in a mirrored comment's marker (``None`` for a native comment)."""
    match = _MARKER.match(text)
    return match.group(2) if match else None
