"""End to end (function_app.py, emulators, Azurite): closing comments, determination spellings and free-text owners
found by real payloads."""

from __future__ import annotations

from typing import Any

import pytest
from test_twoway_e2e import Env, labels, owner_upn, pulled


@pytest.fixture
def env(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(emulators, make_app_settings, monkeypatch)


def test_a_sentinel_closing_comment_becomes_defenders_resolving_comment(env: Env) -> None:
    a = env.a
    env.incident(a, "1101", determination="malware", classification="truePositive")
    pulled(env)
    env.analyst(a, "1101", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity",
                classification_comment="Contained: host isolated, USB blocked by policy.")
    status, body = env.webhook(a, "1101")
    assert status == 200 and body["result"] == "applied", body
    d = env.defender(a, "1101")
    assert (d["status"], d["resolvingComment"]) == ("resolved", "Contained: host isolated, USB blocked by policy.")
    assert env.get(a, "1101")["properties"]["classificationComment"] == d["resolvingComment"]
    env.assert_quiet("at rest after a closing comment")


def test_a_closure_the_app_mirrored_writes_no_resolving_comment_back(env: Env) -> None:
    a = env.a
    env.incident(a, "1102", status="resolved", classification="truePositive", determination="malware")
    pulled(env)
    assert env.get(a, "1102")["properties"]["classificationComment"].endswith("(synced by defender-sync).")
    env.webhook(a, "1102")
    assert env.defender(a, "1102").get("resolvingComment") is None
    env.writes.assert_none("webhook after mirroring a closure")


def _close_with(env: Env, incident_id: str, classification: str, determination: str) -> dict[str, Any]:
    a = env.a
    env.incident(a, incident_id)
    pulled(env)
    env.add_labels(a, incident_id, f"determination:{determination}")
    reason = {"TruePositive": "SuspiciousActivity", "FalsePositive": "InaccurateData",
              "BenignPositive": "SuspiciousButExpected"}[classification]
    env.analyst(a, incident_id, status="Closed", classification=classification, classification_reason=reason)
    status, body = env.webhook(a, incident_id)
    assert status == 200 and body["result"] == "applied", body
    return env.defender(a, incident_id)


def test_graph_refuses_the_other_determination_spelling(env: Env) -> None:
    # Graph v1.0 (and the emulator) take the metadata spelling only; the legacy spelling in a label is read as it.
    d = _close_with(env, "1103", "TruePositive", "compromisedUser")
    assert (d["classification"], d["determination"]) == ("truePositive", "compromisedAccount")
    patches = [w.body for w in env.writes.graph if w.kind == "patch"]
    assert patches and all(p.get("determination") != "compromisedUser" for p in patches)


def test_a_refused_determination_spelling_is_retried_once_with_the_other(env: Env) -> None:
    env.world.graph.legacy_determinations = True  # a service that takes only the other spelling set
    d = _close_with(env, "1104", "FalsePositive", "notMalicious")
    assert (d["status"], d["classification"], d["determination"]) == ("resolved", "falsePositive", "clean")
    assert "determination:notMalicious" in labels(env.get(env.a, "1104"))
    # Defender's "clean" reads as notMalicious: no echo, nothing more to write.
    env.assert_quiet("at rest after the respelled closure")


def test_a_free_text_owner_shows_as_a_label_and_an_analyst_owner_replaces_it(env: Env) -> None:
    a = env.a
    env.incident(a, "1105", assignedTo="Cortex XSOAR MS Graph Dev")
    pulled(env)
    mirror = env.get(a, "1105")
    assert owner_upn(mirror) is None and "owner:Cortex XSOAR MS Graph Dev" in labels(mirror)
    env.webhook(a, "1105")
    assert env.defender(a, "1105")["assignedTo"] == "Cortex XSOAR MS Graph Dev"
    assert "owner:Cortex XSOAR MS Graph Dev" not in (env.defender(a, "1105").get("customTags") or [])
    env.writes.assert_none("webhook after mirroring a free-text owner")
    env.analyst(a, "1105", owner="ana@contoso.com")
    status, body = env.webhook(a, "1105")
    assert status == 200 and body["result"] == "applied", body
    assert env.defender(a, "1105")["assignedTo"] == "ana@contoso.com"
    mirror = env.get(a, "1105")
    assert owner_upn(mirror) == "ana@contoso.com"
    assert not [n for n in labels(mirror) if n.startswith("owner:")]
