"""End to end, issue 10: the onboarding preflight (``sync_check`` and ``python -m sync check``).

Each broken part (a tenant that never consented, read-only roles in a ``sync`` tenant, an identity that cannot write
incidents, a disabled mirror rule) gives exactly one failed check naming its fix, everything else reports ok, and
the check writes nothing anywhere: no Graph or Sentinel write, no ingested row, no table or queue created.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from azure.data.tables import TableServiceClient
from azure.storage.queue import QueueServiceClient
from conftest import apply_settings
from harness import http

from emulators.arm_rbac import READER_ACTIONS
from emulators.base import Fault, match_request
from sync.budget import Deadline
from sync.context import AppContext
from sync.http import ApiError, BearerSession
from sync.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
READ_ONLY_ROLES = ["SecurityIncident.Read.All", "SecurityAlert.Read.All"]
RULE_ID = "7d3a4c1e-2b5f-4e8a-9c6d-0f1e2d3c4b5a"
JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")


class Setup:
    """Two healthy tenants (Contoso sync, Fabrikam pull-only) plus whatever a test breaks."""

    def __init__(self, emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hub, self.world, self.monkeypatch = emulators, emulators.world, monkeypatch
        self.contoso = self.world.add_tenant(name="Contoso")
        self.fabrikam = self.world.add_tenant(name="Fabrikam")
        self.extra = self.world.add_tenant(name="Northwind")
        self.make = make_app_settings

    def configure(self, *, with_extra: bool = False, **overrides: str) -> dict[str, str]:
        tenants = [self.contoso, self.fabrikam] + ([self.extra] if with_extra else [])
        modes = {self.contoso: {"name": "Contoso"}, self.fabrikam: {"name": "Fabrikam", "mode": "pull-only"}}
        if with_extra:
            modes[self.extra] = {"name": "Northwind"}
        self.settings = self.make(tenants, SYNC_TENANTS=json.dumps(modes), **overrides)
        apply_settings(self.monkeypatch, self.settings)
        self.client_id = self.settings["DEFENDER_CLIENT_ID"]
        return self.settings

    def check(self, **params: str) -> dict[str, Any]:
        status, body = http("sync_check", method="GET", route="sync/check", params=params or None)
        assert status == 200, body
        return body


@pytest.fixture
def setup(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Setup:
    return Setup(emulators, make_app_settings, monkeypatch)


def every_check(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    checks = [("shared", c) for c in body["shared"]["checks"]]
    checks += [(t["name"], c) for t in body["tenants"] for c in t["checks"]]
    return checks


def failed(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(scope, c) for scope, c in every_check(body) if c["status"] == "failed"]


def assert_wrote_nothing(setup: Setup) -> None:
    """No write on any side: only GETs (and token requests) reached the emulators; no table or queue exists."""
    writes = [(e.service, e.method, e.path) for e in setup.hub.log.entries()
              if e.method.upper() != "GET" and not (e.service == "entra" and e.path.endswith("/token"))]
    assert writes == [], writes
    assert setup.world.graph.writes == []
    assert setup.hub.sentinel.write_log == []
    assert all(setup.world.rows(t) == [] for t in ("DefenderIncidents_CL", "DefenderAlerts_CL",
                                                   "DefenderEvidence_CL"))
    connection = setup.settings["AzureWebJobsStorage"]
    assert list(TableServiceClient.from_connection_string(connection).list_tables()) == []
    assert list(QueueServiceClient.from_connection_string(connection).list_queues()) == []


def test_a_healthy_setup_reports_every_check_ok_and_writes_nothing(setup: Setup, caplog: Any) -> None:
    setup.configure()
    caplog.set_level(logging.INFO)
    body = setup.check()
    assert body["ok"] is True, failed(body)
    names = [c["check"] for c in body["shared"]["checks"]]
    assert names == ["ingestion.token", "sentinel.workspace", "sentinel.permissions", "storage"]
    for tenant in body["tenants"]:
        assert [c["check"] for c in tenant["checks"]] == ["graph.consent", "graph.roles", "graph.read"]
        assert all(c["ok"] for c in tenant["checks"])
    ingestion = body["shared"]["checks"][0]["details"]
    assert ingestion["dcrImmutableId"] == setup.settings["LOGS_DCR_IMMUTABLE_ID"]
    assert ingestion["streams"] == ["Custom-DefenderIncidents", "Custom-DefenderAlerts", "Custom-DefenderEvidence"]
    assert_wrote_nothing(setup)
    # Never a secret or a token, in the answer or the logs.
    text = json.dumps(body) + caplog.text
    assert setup.settings["DEFENDER_CLIENT_SECRET"] not in text
    assert not JWT.search(text)


def test_a_tenant_that_never_consented_fails_once_with_the_consent_url(setup: Setup) -> None:
    setup.configure(with_extra=True)
    setup.world.entra.revoke_consent(setup.client_id, setup.extra)
    body = setup.check()
    assert body["ok"] is False
    [(scope, check)] = failed(body)
    assert (scope, check["check"]) == ("Northwind", "graph.consent")
    assert "AADSTS700016" in check["found"]
    url = f"{setup.settings['AZURE_AUTHORITY_HOST']}/{setup.extra}/adminconsent?client_id={setup.client_id}"
    assert url in check["fix"] and check["details"]["consentUrl"] == url
    northwind = next(t for t in body["tenants"] if t["name"] == "Northwind")
    assert [c["status"] for c in northwind["checks"]] == ["failed", "skipped", "skipped"]
    assert_wrote_nothing(setup)


def test_read_only_roles_in_a_sync_tenant_fail_once_naming_the_missing_role(setup: Setup) -> None:
    setup.configure()
    for tenant in (setup.contoso, setup.fabrikam):   # the customer granted only read roles, in both tenants
        setup.world.entra.grant_roles(setup.client_id, tenant, READ_ONLY_ROLES)
    body = setup.check()
    [(scope, check)] = failed(body)    # Fabrikam is pull-only: read roles are enough there
    assert (scope, check["check"]) == ("Contoso", "graph.roles")
    assert check["details"]["missing"] == ["SecurityIncident.ReadWrite.All"]
    assert "SecurityIncident.ReadWrite.All" in check["fix"] and "adminconsent" in check["fix"]
    contoso = next(t for t in body["tenants"] if t["name"] == "Contoso")
    assert contoso["checks"][2]["status"] == "ok", "the read still works and says so"
    assert_wrote_nothing(setup)
    # As Graph does, the emulator enforces the roles the token carries: a PATCH with read-only roles is refused.
    ctx = AppContext(load_settings())
    session = BearerSession(ctx.credentials.graph(setup.contoso), ctx.settings.graph_scope)
    with pytest.raises(ApiError) as info:
        session.request("PATCH", f"{ctx.settings.graph_endpoint}/v1.0/security/incidents/1", json={"status": "active"})
    assert info.value.status == 403


def test_a_workspace_identity_without_write_permission_fails_once(setup: Setup) -> None:
    setup.configure()
    setup.hub.sentinel.permissions.assign(setup.world.managed_identity.principal_id, READER_ACTIONS)
    body = setup.check()
    [(scope, check)] = failed(body)
    assert (scope, check["check"]) == ("shared", "sentinel.permissions")
    assert check["details"]["missing"] == ["Microsoft.SecurityInsights/incidents/write",
                                           "Microsoft.SecurityInsights/incidents/comments/write"]
    assert "Microsoft Sentinel Responder" in check["fix"]
    assert all(t["ok"] for t in body["tenants"]), "reported once, not per tenant"
    assert_wrote_nothing(setup)
    # Strict like ARM: the identity that lacks the permission cannot create an incident either.
    ctx = AppContext(load_settings())
    with pytest.raises(ApiError) as info:
        ctx.sentinel.put_incident("0b7c", {"title": "t", "severity": "Low", "status": "New"}, etag=None,
                                  deadline=Deadline(30))
    assert info.value.status == 403 and info.value.code == "AuthorizationFailed"


def test_a_disabled_mirror_rule_fails_once_and_a_missing_one_says_deploy(setup: Setup) -> None:
    setup.configure(SYNC_MIRROR_TARGET="defender-portal", SYNC_MIRROR_RULE_ID=RULE_ID)
    body = setup.check()
    [(_, check)] = failed(body)
    assert check["check"] == "sentinel.mirrorRule" and "does not exist" in check["found"]
    assert "defender-portal" in check["fix"]
    setup.world.portal.put_rule(RULE_ID, enabled=False)
    body = setup.check()
    [(scope, check)] = failed(body)
    assert (scope, check["check"]) == ("shared", "sentinel.mirrorRule")
    assert "disabled" in check["found"] and "Enable the analytics rule" in check["fix"]
    ingestion = body["shared"]["checks"][0]["details"]
    assert "Custom-DefenderMirrorRequests" in ingestion["streams"]
    setup.world.portal.set_rule_enabled(RULE_ID, True)
    assert setup.check()["ok"] is True
    assert_wrote_nothing(setup)


def test_one_slow_tenant_reports_a_timeout_without_holding_the_answer(setup: Setup) -> None:
    setup.configure(with_extra=True)
    setup.hub.faults.rule("entra", match_request("POST", rf"/{setup.extra}/oauth2"), Fault("delay", seconds=8))
    started = time.monotonic()
    body = setup.check(timeout="2")
    elapsed = time.monotonic() - started
    assert elapsed < 6, f"the answer took {elapsed:.1f} s"
    [(scope, check)] = failed(body)
    assert (scope, check["check"]) == ("Northwind", "graph.consent")
    assert "no answer within" in check["found"]


def test_a_bad_timeout_is_a_400(setup: Setup) -> None:
    setup.configure()
    status, body = http("sync_check", method="GET", route="sync/check", params={"timeout": "600"})
    assert status == 400 and body["error"]["code"] == "invalid_timeout"


def test_the_cli_prints_a_table_and_exits_non_zero_on_a_failure(setup: Setup, tmp_path: Path) -> None:
    settings = setup.configure(with_extra=True)
    setup.world.entra.revoke_consent(setup.client_id, setup.extra)
    # local.settings.json holds the settings; the environment overrides the file (here: the tenant list).
    local = {"IsEncrypted": False, "Values": {**settings, "DEFENDER_TENANT_IDS": "not-a-guid"}}
    (tmp_path / "local.settings.json").write_text(json.dumps(local), encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DEFENDER_TENANT_IDS": settings["DEFENDER_TENANT_IDS"]}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sync", "check", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    result = cli()
    assert result.returncode == 1, result.stderr
    assert "graph.consent" in result.stdout and "FAILED" in result.stdout and "adminconsent" in result.stdout
    assert "SOME CHECKS FAILED" in result.stdout
    assert settings["DEFENDER_CLIENT_SECRET"] not in result.stdout + result.stderr
    assert not JWT.search(result.stdout + result.stderr)
    setup.world.entra.consent(setup.client_id, setup.extra)
    result = cli("--json")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["ok"] is True
    env.pop("DEFENDER_TENANT_IDS")   # now the file's invalid value applies
    result = cli()
    assert result.returncode == 2 and "DEFENDER_TENANT_IDS" in result.stderr
