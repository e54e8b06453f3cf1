"""Randomized model test of the two-way sync (issue 3), driven only through function_app.py.

Each seed builds two tenants with a few incidents, mirrors them, then interleaves random operations:

* Defender edits through the Graph world API: status (resolve with a valid classification + determination, reopen,
  in progress, awaiting action), ``assignedTo``, ``customTags`` add/remove, comments;
* Sentinel analyst edits: status (close with classification + reason, reopen), owner, labels add/remove (user tags and
  ``determination:<value>`` labels, valid or not), comments; after each, the Logic App's trigger body is kept and the
  webhook is delivered now, dropped, duplicated or delayed (delayed bodies are delivered later, in random order);
* ``defender_pull``, ``sentinel_reconcile`` and ``sync_run`` (reconcile) runs;
* concurrency: two webhook deliveries of one incident at the same moment, and a reconcile beside a pull (sometimes
  with a webhook as well), each in its own thread, as separate instances would run them;
* crashes: the k-th request to Graph or Sentinel in the next run fails for good (a non-retryable error or a dropped
  connection), so a sync stops between any two of its reads and writes; and restarts (a new process context).

When the edits stop, the leftover trigger bodies are delivered and pull + reconcile run until a round writes nothing
(bounded). Then, for every incident, every synced field agrees on both sides per PRODUCT.md's mapping, each native
comment has exactly one copy on the other side, and one more pull + reconcile makes zero writes anywhere.

``MODEL_SEEDS`` runs more seeds locally: a count (``200``), a range (``100-299``) or a list (``3,17,42``);
``MODEL_OPS`` sets the operations per seed. The figures (seeds, operations, writes per synced change) are printed at
the end of the module.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import apply_settings
from harness import http, run_timer

from emulators.base import EmuRequest, Fault, match_request
from sync.targets.sentinel_api import SentinelTarget


def _seeds() -> list[int]:
    raw = os.environ.get("MODEL_SEEDS", "").strip()
    if not raw:
        return list(range(1, 31))
    if "," in raw:
        return [int(x) for x in raw.split(",") if x.strip()]
    if "-" in raw:
        low, high = raw.split("-", 1)
        return list(range(int(low), int(high) + 1))
    return list(range(1, int(raw) + 1))


SEEDS = _seeds()
OPS = int(os.environ.get("MODEL_OPS", "45"))
QUIESCE_ROUNDS = 6

OWNER_MAP = {"lead@mssp.example": "lead@contoso.com"}          # Sentinel identity -> Defender identity
DEFENDER_OWNERS = [None, "kai@contoso.com", "lead@contoso.com", "Mixed.Case@Contoso.com"]
SENTINEL_OWNERS = [None, "analyst@mssp.example", "lead@mssp.example", "kai@contoso.com", "Lead@MSSP.Example"]
TAGS = ["vip", "finance", "ransomware", "needs-review", "Tier2", "客户", "<b>x</b>"]
DETERMINATIONS = {
    "truePositive": ["multiStagedAttack", "maliciousUserActivity", "compromisedAccount", "malware", "phishing",
                     "unwantedSoftware", "other", "unknown"],
    "informationalExpectedActivity": ["securityTesting", "lineOfBusinessApplication", "confirmedActivity", "other"],
    "falsePositive": ["notMalicious", "notEnoughDataToValidate", "other"],
    "unknown": ["unknown"],
}
ALL_DETERMINATIONS = sorted({d for v in DETERMINATIONS.values() for d in v} | {"bogusValue"})
SENTINEL_CLOSURES = [("TruePositive", "SuspiciousActivity"), ("FalsePositive", "InaccurateData"),
                     ("FalsePositive", "IncorrectAlertLogic"), ("BenignPositive", "SuspiciousButExpected"),
                     ("Undetermined", None)]
STATUS_TO_SENTINEL = {"active": "New", "inProgress": "Active", "awaitingAction": "Active", "resolved": "Closed"}
CLASSIFICATION_FROM_SENTINEL = {"TruePositive": "truePositive", "FalsePositive": "falsePositive",
                                "BenignPositive": "informationalExpectedActivity", "Undetermined": "unknown"}
APP_LABEL_PREFIXES = ("tenant:", "determination:")
APP_LABELS = ("defender-sync", "redirected")
DEFENDER_MARK = "[Synced from Defender XDR"
SENTINEL_MARK = "[Synced from Microsoft Sentinel"

FIGURES: dict[str, Any] = {"seeds": 0, "operations": Counter(), "events": Counter(), "changes": 0,
                           "defender_changes": 0, "sentinel_changes": 0, "graph_writes": 0, "sentinel_writes": 0,
                           "quiesce_rounds": []}


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not FIGURES["seeds"]:
        return
    ops = FIGURES["operations"]
    changes = max(FIGURES["changes"], 1)
    lines = [
        f"model test: {FIGURES['seeds']} seeds, {sum(ops.values())} operations "
        f"({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))})",
        f"  events: {', '.join(f'{k} {v}' for k, v in sorted(FIGURES['events'].items()))}",
        f"  real synced changes: {FIGURES['changes']} (Defender {FIGURES['defender_changes']}, "
        f"Sentinel {FIGURES['sentinel_changes']})",
        f"  writes: Graph {FIGURES['graph_writes']}, Sentinel {FIGURES['sentinel_writes']}; "
        f"writes per synced change {(FIGURES['graph_writes'] + FIGURES['sentinel_writes']) / changes:.2f} "
        f"(other side only: Sentinel writes per Defender change "
        f"{FIGURES['sentinel_writes'] / max(FIGURES['defender_changes'], 1):.2f}, Graph writes per Sentinel change "
        f"{FIGURES['graph_writes'] / max(FIGURES['sentinel_changes'], 1):.2f})",
        f"  pull+reconcile rounds to quiesce: max {max(FIGURES['quiesce_rounds'])}, "
        f"mean {sum(FIGURES['quiesce_rounds']) / len(FIGURES['quiesce_rounds']):.2f}",
    ]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@dataclass
class Model:
    """One seed's world: the two sides, the kept trigger bodies, the operation log and the counters."""

    seed: int
    rng: random.Random
    hub: Any
    world: Any
    sentinel: Any
    settings: dict[str, str]
    monkeypatch: pytest.MonkeyPatch
    incidents: list[tuple[str, str]] = field(default_factory=list)        # live (tenant, incident ID): both sides
    redirected: list[tuple[str, str, str]] = field(default_factory=list)  # (tenant, loser, winner) merged in Defender
    gone: list[tuple[str, str]] = field(default_factory=list)             # deleted in Defender (404)
    deleted: list[tuple[str, str]] = field(default_factory=list)          # Sentinel incident deleted by an analyst
    pull_only: set[str] = field(default_factory=set)                      # tenants in mode pull-only
    pending: list[dict[str, Any]] = field(default_factory=list)           # delayed trigger bodies
    log: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)          # operations drawn
    events: Counter[str] = field(default_factory=Counter)       # webhook fates, faults that fired or not
    defender_changes: int = 0
    sentinel_changes: int = 0
    comment_counter: int = 0
    in_flight: bool = False

    # -------------------------------------------------------------------------------- helpers

    def name(self, tenant: str, incident_id: str) -> str:
        return SentinelTarget(None).name_for(tenant, incident_id)  # type: ignore[arg-type]

    def pick(self) -> tuple[str, str]:
        return self.rng.choice(self.incidents)

    def note(self, text: str) -> None:
        self.log.append(text)

    def defender(self, tenant: str, incident_id: str) -> dict[str, Any]:
        return self.world.get_incident(tenant, incident_id)

    def resource(self, tenant: str, incident_id: str) -> dict[str, Any]:
        resource = self.sentinel.get(self.name(tenant, incident_id))
        assert resource is not None, f"seed {self.seed}: incident {incident_id} lost its Sentinel incident"
        return resource

    def text(self, side: str) -> str:
        self.comment_counter += 1
        flavour = self.rng.choice(["plain note", "<script>alert('x')</script>", "**markdown** & <i>html</i>",
                                  "多语言 comment 🚀", "line one\nline two"])
        return f"{side} comment #{self.comment_counter} (seed {self.seed}): {flavour}"

    # -------------------------------------------------------------------------------- Defender side

    def defender_status(self) -> None:
        tenant, incident_id = self.pick()
        current = self.defender(tenant, incident_id)
        choices = [s for s in ("active", "inProgress", "resolved", "resolved", "awaitingAction")
                   if s != current["status"] or s == "resolved"]
        status = self.rng.choice(choices)
        if status == "awaitingAction" and self.rng.random() < 0.7:
            status = "inProgress"
        changes: dict[str, Any] = {"status": status}
        if status == "resolved":
            classification = self.rng.choice(sorted(DETERMINATIONS))
            determination = self.rng.choice(DETERMINATIONS[classification])
            if (current["status"], current["classification"], current["determination"]) == (
                    "resolved", classification, determination):
                return
            changes.update(classification=classification, determination=determination)
        self.world.update_incident(tenant, incident_id, **changes)
        self.defender_changes += 1
        self.note(f"D {tenant[:4]}/{incident_id} {changes}")

    def defender_owner(self) -> None:
        tenant, incident_id = self.pick()
        current = (self.defender(tenant, incident_id).get("assignedTo") or "").lower() or None
        owner = self.rng.choice([o for o in DEFENDER_OWNERS if (o.lower() if o else None) != current])
        self.world.update_incident(tenant, incident_id, assignedTo=owner)
        self.defender_changes += 1
        self.note(f"D {tenant[:4]}/{incident_id} assignedTo={owner}")

    def defender_tags(self) -> None:
        tenant, incident_id = self.pick()
        tags = list(self.defender(tenant, incident_id).get("customTags") or [])
        if tags and self.rng.random() < 0.45:
            tag = self.rng.choice(tags)
            tags.remove(tag)
            what = f"-{tag}"
        else:
            options = [t for t in TAGS if t not in tags]
            if not options:
                return
            tag = self.rng.choice(options)
            tags.append(tag)
            what = f"+{tag}"
        self.world.update_incident(tenant, incident_id, customTags=tags)
        self.defender_changes += 1
        self.note(f"D {tenant[:4]}/{incident_id} tags {what}")

    def defender_comment(self) -> None:
        tenant, incident_id = self.pick()
        comments = list(self.defender(tenant, incident_id).get("comments") or [])
        comments.append({"@odata.type": "#microsoft.graph.security.alertComment", "comment": self.text("Defender"),
                         "createdByDisplayName": self.rng.choice(["Kai C", "SOC Tier 1", "李雷"]),
                         "createdDateTime": self.world.clock.now()})
        self.world.update_incident(tenant, incident_id, comments=comments)
        self.defender_changes += 1
        self.note(f"D {tenant[:4]}/{incident_id} comment")

    def _tenant_with(self, minimum: int) -> str | None:
        tenants = sorted({t for t, _ in self.incidents if sum(1 for u, _ in self.incidents if u == t) >= minimum})
        return self.rng.choice(tenants) if tenants else None

    def defender_redirect(self) -> None:
        """Defender merges one incident into another (the loser becomes ``redirected``, its alerts move)."""
        tenant = self._tenant_with(3)
        if tenant is None:
            return
        loser, winner = self.rng.sample([i for t, i in self.incidents if t == tenant], 2)
        self.world.redirect_incident(tenant, loser, winner)
        self.incidents.remove((tenant, loser))
        self.redirected.append((tenant, loser, winner))
        self.defender_changes += 1
        self.note(f"D {tenant[:4]}/{loser} redirected into {winner}")

    def defender_delete(self) -> None:
        tenant = self._tenant_with(3)
        if tenant is None:
            return
        incident_id = self.rng.choice([i for t, i in self.incidents if t == tenant])
        self.world.delete_incident(tenant, incident_id)
        self.incidents.remove((tenant, incident_id))
        self.gone.append((tenant, incident_id))
        self.note(f"D {tenant[:4]}/{incident_id} deleted (404 from now on)")

    def sentinel_delete(self) -> None:
        tenant = self._tenant_with(3)
        if tenant is None:
            return
        incident_id = self.rng.choice([i for t, i in self.incidents if t == tenant])
        self.sentinel.analyst_delete(self.name(tenant, incident_id))
        self.incidents.remove((tenant, incident_id))
        self.deleted.append((tenant, incident_id))
        self.note(f"S {tenant[:4]}/{incident_id} deleted by an analyst")

    # -------------------------------------------------------------------------------- Sentinel side

    def _analyst(self, tenant: str, incident_id: str, what: str, **changes: Any) -> None:
        self.sentinel.analyst_update(self.name(tenant, incident_id), **changes)
        self.sentinel_changes += 1
        self.note(f"S {tenant[:4]}/{incident_id} {what}")
        self._trigger(tenant, incident_id)

    def _trigger(self, tenant: str, incident_id: str) -> None:
        """The automation rule runs the Logic App: its body is delivered now, dropped, duplicated or delayed."""
        body = self.sentinel.trigger_body(self.name(tenant, incident_id))
        fate = "later" if self.in_flight else self.rng.choices(["now", "drop", "twice", "later"],
                                                               weights=[45, 20, 10, 25])[0]
        self.events[f"webhook-{fate}"] += 1
        if fate == "later":
            self.pending.append(body)
            return
        if fate == "drop":
            return
        for _ in range(2 if fate == "twice" else 1):
            self.deliver(body)

    def deliver(self, body: dict[str, Any]) -> None:
        status, answer = http("sentinel_webhook", body=body, route="sentinel/incidents")
        assert status in (200, 503), f"seed {self.seed}: webhook answered {status}: {answer}"
        self.note(f"  webhook {body['object']['name'][:8]} -> {status} "
                  f"{answer.get('result') if status == 200 else answer['error']['code']}")

    def sentinel_status(self) -> None:
        tenant, incident_id = self.pick()
        props = self.resource(tenant, incident_id)["properties"]
        status = self.rng.choice([s for s in ("New", "Active", "Closed", "Closed") if s != props["status"]
                                  or s == "Closed"])
        if status == "Closed":
            classification, reason = self.rng.choice(SENTINEL_CLOSURES)
            if (props["status"], props.get("classification"), props.get("classificationReason")) == (
                    "Closed", classification, reason):
                return
            self._analyst(tenant, incident_id, f"close {classification}/{reason}", status="Closed",
                          classification=classification, classification_reason=reason)
        else:
            self._analyst(tenant, incident_id, f"status {status}", status=status)

    def sentinel_owner(self) -> None:
        tenant, incident_id = self.pick()
        props = self.resource(tenant, incident_id)["properties"]
        current = ((props.get("owner") or {}).get("userPrincipalName") or "").lower() or None
        owner = self.rng.choice([o for o in SENTINEL_OWNERS if (o.lower() if o else None) != current])
        self._analyst(tenant, incident_id, f"owner={owner}", owner=owner)

    def sentinel_labels(self, determination: bool = False) -> None:
        tenant, incident_id = self.pick()
        current = list(self.resource(tenant, incident_id)["properties"].get("labels") or [])
        user = [lbl["labelName"] for lbl in current if not _is_app_label(lbl["labelName"])]
        if determination:
            value = self.rng.choice(ALL_DETERMINATIONS)
            label = f"determination:{value}"
            if label in {lbl["labelName"] for lbl in current}:
                return
            labels = [*current, {"labelName": label}]
            what = f"+{label}"
        elif user and self.rng.random() < 0.45:
            tag = self.rng.choice(user)
            labels = [lbl for lbl in current if lbl["labelName"] != tag]
            what = f"-{tag}"
        else:
            options = [t for t in TAGS if t not in user]
            if not options:
                return
            tag = self.rng.choice(options)
            labels = [*current, {"labelName": tag}]
            what = f"+{tag}"
        self._analyst(tenant, incident_id, f"labels {what}", labels=labels)

    def sentinel_comment(self) -> None:
        tenant, incident_id = self.pick()
        self.sentinel.analyst_comment(self.name(tenant, incident_id), self.text("Sentinel"),
                                      self.rng.choice(["analyst@mssp.example", "lead@mssp.example"]))
        self.sentinel_changes += 1
        self.note(f"S {tenant[:4]}/{incident_id} comment")
        self._trigger(tenant, incident_id)

    # -------------------------------------------------------------------------------- the app

    def pull(self) -> None:
        self.note("pull")
        run_timer("defender_pull")

    def reconcile(self) -> None:
        if self.rng.random() < 0.3:
            self.note("sync_run reconcile")
            status, answer = http("sync_run", body={"direction": "reconcile"})
            assert status == 200, answer
        else:
            self.note("reconcile")
            run_timer("sentinel_reconcile")

    def concurrent_webhooks(self) -> None:
        """Two automation-rule runs of one incident (an analyst comments, then acts) deliver at the same moment; the
        comment listing is slowed so each sync holds its Defender read while the other runs."""
        tenant, incident_id = self.pick()
        name = self.name(tenant, incident_id)
        self.sentinel.analyst_comment(name, self.text("Sentinel"), "analyst@mssp.example")
        self.sentinel_changes += 1
        body = self.sentinel.trigger_body(name)
        self.note(f"S {tenant[:4]}/{incident_id} comment, two webhooks at once")
        self.hub.faults.queue("sentinel", Fault("delay", seconds=0.2), times=2,
                              when=match_request("GET", path=r"/comments$"))
        try:
            _at_once([lambda: self.deliver(body), lambda: self.deliver(body)])
        finally:
            self.hub.faults.clear()

    def concurrent_cycles(self) -> None:
        """A reconcile beside a pull (two timers on two instances), sometimes with a webhook delivered meanwhile."""
        calls: list[Callable[[], None]] = [self.pull, self.reconcile_now(self.rng.random() < 0.3)]
        if self.rng.random() < 0.5:
            tenant, incident_id = self.pick()
            body = self.sentinel.trigger_body(self.name(tenant, incident_id))
            calls.append(lambda: self.deliver(body))
        self.note(f"{len(calls)} runs at once")
        _at_once(calls)

    def reconcile_now(self, via_http: bool) -> Callable[[], None]:
        def run() -> None:
            if via_http:
                status, answer = http("sync_run", body={"direction": "reconcile"})
                assert status == 200, answer
            else:
                run_timer("sentinel_reconcile")
        return run

    def deliver_pending(self) -> None:
        if not self.pending:
            return
        body = self.pending.pop(self.rng.randrange(len(self.pending)))
        if self.rng.random() < 0.2:
            self.pending.append(body)  # delivered again later as well (a Logic App retry)
        self.deliver(body)

    def crash(self) -> None:
        """The k-th request to one service in the next run fails: for good (a non-retryable error: the run stops
        right there, between two of its reads and writes, as a killed process would) or once (a dropped connection,
        retried by the client)."""
        service = self.rng.choice(["graph", "sentinel"])
        writes_only = self.rng.random() < 0.3
        k = self.rng.randint(1, 2 if writes_only else 3)
        fault = Fault("drop") if self.rng.random() < 0.25 else Fault("status", 400)
        self._during_next_run(f"crash {service} k={k}{' write' if writes_only else ''} {fault.kind}", service, k,
                              writes_only, fault, None)

    def interfere(self) -> None:
        """An edit on either side lands in the middle of a run, right before the k-th request to one service (so
        between the app's read and its write: a 409 and a fresh merge, or a Defender change the run did not see)."""
        service = self.rng.choice(["graph", "sentinel"])
        k = self.rng.randint(1, 4)
        edits = [self.defender_status, self.defender_owner, self.defender_tags, self.defender_comment,
                 self.sentinel_status, self.sentinel_owner, self.sentinel_labels, self.sentinel_comment]
        edit = self.rng.choice(edits)

        def act() -> None:
            self.in_flight = True   # the trigger body of a Sentinel edit made now is delivered later
            try:
                edit()
            finally:
                self.in_flight = False

        self._during_next_run(f"interfere {service} k={k} {edit.__name__}", service, k, False, None, act)

    def _during_next_run(self, what: str, service: str, k: int, writes_only: bool, fault: Fault | None,
                         action: Callable[[], None] | None) -> None:
        """Run a random cycle; at its k-th request to ``service`` inject ``fault`` or run ``action`` (then serve the
        request normally)."""
        seen = [0]
        fired: list[bool] = []

        def when(request: EmuRequest) -> bool:
            if fired or (writes_only and request.method.upper() == "GET"):
                return False
            seen[0] += 1
            if seen[0] != k:
                return False
            fired.append(True)
            if action is not None:
                action()
            return fault is not None

        self.hub.faults.rule(service, when, fault or Fault("delay", seconds=0.0))
        run = self.rng.choice(["pull", "reconcile", "webhook"])
        self.note(f"{what} during {run}")
        try:
            if run == "pull":
                self.pull()
            elif run == "reconcile":
                self.reconcile()
            else:
                tenant, incident_id = self.pick()
                self.deliver(self.sentinel.trigger_body(self.name(tenant, incident_id)))
        finally:
            self.hub.faults.clear()
        self.note(f"  {'fired' if fired else 'did not fire'}")
        self.events[f"{what.split()[0]}-{'fired' if fired else 'missed'}"] += 1

    def restart(self) -> None:
        """A new worker process: a fresh context (clients, caches) built from the same settings."""
        self.note("restart")
        page = "49" if self.settings.get("SYNC_GRAPH_PAGE_SIZE") != "49" else "50"
        self.settings = {**self.settings, "SYNC_GRAPH_PAGE_SIZE": page}
        apply_settings(self.monkeypatch, self.settings)

    # -------------------------------------------------------------------------------- checks

    def writes(self) -> tuple[int, int]:
        return len(self.world.graph.writes), self.sentinel.writes()

    def disagreements(self) -> list[str]:
        problems: list[str] = []
        for tenant, incident_id in self.incidents:
            problems.extend(self._incident_problems(tenant, incident_id))
        for tenant, loser, winner in self.redirected:
            problems.extend(self._incident_problems(tenant, loser, winner=winner))
        for tenant, incident_id in self.deleted:
            if self.sentinel.get(self.name(tenant, incident_id)) is not None:
                problems.append(f"{tenant[:4]}/{incident_id}: a deleted Sentinel incident was recreated")
        for tenant in self.pull_only:
            written = [w for w in self.world.graph.writes if w.tenant_id == tenant]
            if written:
                problems.append(f"pull-only tenant {tenant[:4]} got Graph writes: {[w.body for w in written][:3]}")
        return problems

    def _incident_problems(self, tenant: str, incident_id: str, winner: str | None = None) -> list[str]:
        """How the two sides of one incident disagree, per PRODUCT.md's mapping (empty when in sync)."""
        problems: list[str] = []
        where = f"{tenant[:4]}/{incident_id}"
        d = self.defender(tenant, incident_id)
        resource = self.sentinel.get(self.name(tenant, incident_id))
        if resource is None:
            return [f"{where}: no Sentinel incident"]
        p = resource["properties"]
        label_names = [lbl["labelName"] for lbl in p.get("labels") or []]
        det_labels = {n for n in label_names if n.startswith("determination:")}
        if winner is not None:
            if (p["status"], p.get("classification")) != ("Closed", "Undetermined") or "redirected" not in label_names:
                problems.append(f"{where}: redirected into {winner} but Sentinel shows {p['status']}/"
                                f"{p.get('classification')} labels {label_names}")
            links = [c for c in self.sentinel.comments(self.name(tenant, incident_id))
                     if f"into incident {winner}" in c["properties"]["message"]]
            if len(links) != 1:
                problems.append(f"{where}: {len(links)} comments link the surviving incident {winner}")
            if det_labels:
                problems.append(f"{where}: redirected incident with determination labels {sorted(det_labels)}")
        elif STATUS_TO_SENTINEL[d["status"]] != p["status"]:
            problems.append(f"{where}: status D={d['status']} S={p['status']}")
        elif d["status"] == "resolved":
            if CLASSIFICATION_FROM_SENTINEL.get(p.get("classification")) != d["classification"]:
                problems.append(f"{where}: classification D={d['classification']} S={p.get('classification')}")
            det = d["determination"]
            if det not in DETERMINATIONS.get(d["classification"], []):
                problems.append(f"{where}: determination {det} invalid for {d['classification']}")
            want = set() if det == "unknown" else {f"determination:{det}"}
            if det_labels != want:
                problems.append(f"{where}: determination D={det} S labels={sorted(det_labels)}")
        elif det_labels:
            problems.append(f"{where}: open incident with determination labels {sorted(det_labels)}")
        s_owner = ((p.get("owner") or {}).get("userPrincipalName") or "").lower() or None
        s_owner = OWNER_MAP.get(s_owner, s_owner) if s_owner else None
        d_owner = (d.get("assignedTo") or "").lower() or None
        if s_owner != d_owner:
            problems.append(f"{where}: owner D={d_owner} S={s_owner}")
        s_tags = {n for n in label_names if not _is_app_label(n)}
        d_tags = {t for t in d.get("customTags") or [] if not _is_app_label(t)}
        if s_tags != d_tags:
            problems.append(f"{where}: tags D={sorted(d_tags)} S={sorted(s_tags)}")
        if "defender-sync" not in label_names:
            problems.append(f"{where}: labels lost defender-sync: {label_names}")
        # Sentinel comments reach Defender only where the app writes Defender: never for a pull-only tenant, and
        # for a redirected incident only those the app saw before the merge (so at most once each).
        to_defender = "none" if tenant in self.pull_only else "at-most-once" if winner is not None else "exactly-once"
        problems.extend(self._comment_problems(where, d, self.sentinel.comments(self.name(tenant, incident_id)),
                                               to_defender=to_defender))
        return problems

    def _comment_problems(self, where: str, d: dict[str, Any], s_comments: list[dict[str, Any]], *,
                          to_defender: str) -> list[str]:
        problems = []
        d_texts = [c["comment"] for c in d.get("comments") or []]
        # The redirect note the app writes on a merged incident's mirror is its own, not a copied comment.
        s_texts = [c["properties"]["message"] for c in s_comments
                   if not c["properties"]["message"].startswith(f"{DEFENDER_MARK} · Defender XDR · ref:")]
        d_native = [t for t in d_texts if not t.startswith((DEFENDER_MARK, SENTINEL_MARK))]
        s_native = [t for t in s_texts if not t.startswith((DEFENDER_MARK, SENTINEL_MARK))]
        d_copies = Counter(t.split("\n", 1)[1] for t in s_texts if t.startswith(DEFENDER_MARK))
        s_copies = Counter(t.split("\n", 1)[1] for t in d_texts if t.startswith(SENTINEL_MARK))
        if any(t.startswith(DEFENDER_MARK) for t in d_texts):
            problems.append(f"{where}: a Defender comment was echoed back to Defender")
        if any(t.startswith(SENTINEL_MARK) for t in s_texts):
            problems.append(f"{where}: a Sentinel comment was echoed back to Sentinel")
        for side, native, copies in (("Defender", d_native, d_copies), ("Sentinel", s_native, s_copies)):
            want = Counter(native)
            if side == "Sentinel" and to_defender != "exactly-once":
                want = Counter() if to_defender == "none" else copies & want
            if copies != want:
                missing = want - copies
                doubled = {t: n for t, n in copies.items() if n > want.get(t, 0)}
                problems.append(f"{where}: {side} comments copied wrong: missing {list(missing)[:3]}, "
                                f"extra {list(doubled)[:3]}")
        return problems


def _at_once(calls: list[Callable[[], None]]) -> None:
    """Run the calls in threads released together; re-raise the first failure."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], None]) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]


def _probe_links(model: Model) -> None:
    """After all that, every link still carries a fresh edit each way (no link wedged, no base gone stale). The
    Sentinel edits come first and alone: label- and comment-only, with no webhook and no ``lastModifiedTimeUtc`` bump,
    so only the reconcile sweep can find them."""
    model.sentinel.comment_bumps_modified = False
    model.sentinel.label_bumps_modified = False
    for n, (tenant, incident_id) in enumerate(model.incidents):
        name = model.name(tenant, incident_id)
        current = model.resource(tenant, incident_id)["properties"].get("labels") or []
        model.sentinel.analyst_update(name, labels=[*current, {"labelName": f"probe-s{n}"}])
        model.sentinel.analyst_comment(name, f"probe comment {n}")
    run_timer("sentinel_reconcile")
    for n, (tenant, incident_id) in enumerate(model.incidents):
        tags = list(model.defender(tenant, incident_id).get("customTags") or [])
        copied = any(c["comment"].endswith(f"\nprobe comment {n}")
                     for c in model.defender(tenant, incident_id)["comments"])
        if tenant in model.pull_only:   # Defender wins and is never written: the label is taken off again
            labels = {lbl["labelName"] for lbl in model.resource(tenant, incident_id)["properties"]["labels"]}
            assert f"probe-s{n}" not in tags and f"probe-s{n}" not in labels and not copied, (
                f"seed {model.seed}: pull-only {tenant[:4]}/{incident_id} took a Sentinel edit")
        else:
            assert f"probe-s{n}" in tags, f"seed {model.seed}: {tenant[:4]}/{incident_id}: Sentinel label not synced"
            assert copied, f"seed {model.seed}: {tenant[:4]}/{incident_id}: Sentinel comment not copied"
        model.world.update_incident(tenant, incident_id, customTags=[*tags, f"probe-d{n}"])
    run_timer("defender_pull")
    for n, (tenant, incident_id) in enumerate(model.incidents):
        s_tags = {lbl["labelName"] for lbl in model.resource(tenant, incident_id)["properties"]["labels"]}
        want = {f"probe-d{n}"} | (set() if tenant in model.pull_only else {f"probe-s{n}"})
        assert want <= s_tags, (
            f"seed {model.seed}: {tenant[:4]}/{incident_id}: Defender tag not mirrored: {sorted(s_tags)}")
    assert not model.disagreements()


def _is_app_label(name: str) -> bool:
    lowered = name.lower()
    return lowered in APP_LABELS or lowered.startswith(APP_LABEL_PREFIXES)


def _setup(seed: int, emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Model:
    rng = random.Random(seed)
    world = emulators.world
    tenants = [world.add_tenant(name="Contoso"), world.add_tenant(name="Fabrikam")]
    policy = ["latest", "defender", "sentinel"][seed % 3]
    pull_only = seed % 5 == 4           # every fifth seed, the second tenant is pull-only (never writes Defender)
    overrides = {tenants[0]: {"name": "Contoso"},
                 tenants[1]: {"name": "Fabrikam", **({"mode": "pull-only"} if pull_only else {})}}
    settings = make_app_settings(tenants, SYNC_CONFLICT_POLICY=policy, SYNC_OWNER_MAP=json.dumps(OWNER_MAP),
                                 SYNC_TENANTS=json.dumps(overrides))
    apply_settings(monkeypatch, settings)
    sentinel = emulators.sentinel
    sentinel.comment_bumps_modified = rng.random() < 0.5
    sentinel.label_bumps_modified = rng.random() < 0.7
    model = Model(seed, rng, emulators, world, sentinel, settings, monkeypatch)
    if pull_only:
        model.pull_only.add(tenants[1])
    for tenant in tenants:
        for n in range(rng.randint(2, 4)):
            incident_id = str(100 + n)
            doc: dict[str, Any] = {"id": incident_id, "severity": rng.choice(["high", "medium", "low"]),
                                   "displayName": f"Incident {incident_id}",
                                   "alerts": [{"title": f"Alert {incident_id}-{i}", "status": "new"}
                                              for i in range(rng.randint(1, 2))],
                                   "assignedTo": rng.choice(DEFENDER_OWNERS),
                                   "customTags": rng.sample(TAGS, rng.randint(0, 2))}
            if rng.random() < 0.3:
                classification = rng.choice(sorted(DETERMINATIONS))
                doc.update(status="resolved", classification=classification,
                           determination=rng.choice(DETERMINATIONS[classification]))
            if rng.random() < 0.4:
                doc["comments"] = [{"@odata.type": "#microsoft.graph.security.alertComment",
                                    "comment": model.text("Defender"), "createdByDisplayName": "Seed",
                                    "createdDateTime": world.clock.now()}]
            world.add_incident(tenant, doc)
            model.incidents.append((tenant, incident_id))
    model.note(f"policy={policy} pull_only={pull_only} comment_bumps={sentinel.comment_bumps_modified} "
               f"label_bumps={sentinel.label_bumps_modified} incidents={len(model.incidents)}")
    run_timer("defender_pull")
    return model


def _operations(model: Model) -> list[tuple[str, Callable[[], None], int]]:
    return [
        ("defender-status", model.defender_status, 9), ("defender-owner", model.defender_owner, 5),
        ("defender-tags", model.defender_tags, 6), ("defender-comment", model.defender_comment, 5),
        ("sentinel-status", model.sentinel_status, 9), ("sentinel-owner", model.sentinel_owner, 5),
        ("sentinel-tags", model.sentinel_labels, 6),
        ("sentinel-determination-label", lambda: model.sentinel_labels(determination=True), 3),
        ("sentinel-comment", model.sentinel_comment, 5),
        ("pull", model.pull, 8), ("reconcile", model.reconcile, 5), ("deliver-delayed", model.deliver_pending, 6),
        ("crash", model.crash, 4), ("interfere", model.interfere, 4), ("restart", model.restart, 1),
        ("defender-redirect", model.defender_redirect, 1), ("defender-delete", model.defender_delete, 1),
        ("sentinel-delete", model.sentinel_delete, 1),
        ("concurrent-webhooks", model.concurrent_webhooks, 3), ("concurrent-cycles", model.concurrent_cycles, 3),
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_interleavings_converge(seed: int, emulators: Any, make_app_settings: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = _setup(seed, emulators, make_app_settings, monkeypatch)
    problems = model.disagreements()
    assert not problems, f"seed {seed}: the first mirror is not in sync: {problems}"
    graph0, sentinel0 = model.writes()
    operations = _operations(model)
    names = [o[0] for o in operations]
    weights = [o[2] for o in operations]
    table = {o[0]: o[1] for o in operations}
    for _ in range(OPS):
        op = model.rng.choices(names, weights=weights)[0]
        model.ops[op] += 1
        table[op]()

    # Edits stop: leftover trigger bodies arrive late, in random order; then pull + reconcile until quiet.
    model.rng.shuffle(model.pending)
    while model.pending:
        model.deliver(model.pending.pop())
    rounds = 0
    while True:
        rounds += 1
        before = model.writes()
        model.pull()
        run_timer("sentinel_reconcile")
        if model.writes() == before:
            break
        if rounds == QUIESCE_ROUNDS:
            pytest.fail(f"seed {seed}: still writing after {QUIESCE_ROUNDS} pull+reconcile rounds\n"
                        + "\n".join(model.log[-60:]))
    graph1, sentinel1 = model.writes()

    problems = model.disagreements()
    assert not problems, (f"seed {seed}: the sides disagree after quiescing:\n  " + "\n  ".join(problems)
                          + "\nlast operations:\n" + "\n".join(model.log[-80:]))
    # One more cycle on a quiet system writes nothing, on either side.
    run_timer("defender_pull")
    run_timer("sentinel_reconcile")
    assert model.writes() == (graph1, sentinel1), f"seed {seed}: an extra cycle wrote something"
    _probe_links(model)

    FIGURES["seeds"] += 1
    FIGURES["operations"].update(model.ops)
    FIGURES["events"].update(model.events)
    FIGURES["defender_changes"] += model.defender_changes
    FIGURES["sentinel_changes"] += model.sentinel_changes
    FIGURES["changes"] += model.defender_changes + model.sentinel_changes
    FIGURES["graph_writes"] += graph1 - graph0
    FIGURES["sentinel_writes"] += sentinel1 - sentinel0
    FIGURES["quiesce_rounds"].append(rounds)
