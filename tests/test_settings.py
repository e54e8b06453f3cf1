"""Settings: every invalid value is reported with the setting's name and how to fix it; nothing is half-loaded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sync.settings import SettingsError, load_settings, queue_connection_name, settings_fingerprint

T1 = "11111111-1111-1111-1111-111111111111"
T2 = "22222222-2222-2222-2222-222222222222"
WS = ("/subscriptions/33333333-3333-3333-3333-333333333333/resourceGroups/rg-soc/providers/"
      "Microsoft.OperationalInsights/workspaces/soc")


def base_env(**overrides: str) -> dict[str, str]:
    env = {
        "DEFENDER_TENANT_IDS": f"{T1}, {T2}",
        "DEFENDER_CLIENT_ID": "44444444-4444-4444-4444-444444444444",
        "LOGS_INGESTION_ENDPOINT": "https://dcr.eastus-1.ingest.monitor.azure.com",
        "LOGS_DCR_IMMUTABLE_ID": "dcr-0123456789abcdef0123456789abcdef",
        "SENTINEL_WORKSPACE_ID": WS,
        "AzureWebJobsStorage": "DefaultEndpointsProtocol=https;AccountName=x;EndpointSuffix=core.windows.net",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def problems_of(env: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    return info.value.problems


def test_defaults_are_documented_values() -> None:
    s = load_settings(base_env())
    assert [t.tenant_id for t in s.tenants] == [T1, T2]
    assert s.graph_endpoint == "https://graph.microsoft.com"
    assert s.graph_scope == "https://graph.microsoft.com/.default"
    assert s.arm_scope == "https://management.azure.com/.default"
    assert s.logs_ingestion_scope == "https://monitor.azure.com/.default"
    assert s.initial_lookback_days == 7 and s.overlap_seconds == 120
    assert s.conflict_policy == "latest" and s.fanout == "inline" and s.queue_name == "defender-tenant-work"
    assert s.webhook_max_body_bytes == 4 * 1024 * 1024
    assert s.disable_instance_discovery is False
    assert all(t.mode == "sync" for t in s.tenants)


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("DEFENDER_TENANT_IDS", "contoso.onmicrosoft.com", "not a tenant ID"),
    ("DEFENDER_TENANT_IDS", " , ", "lists no tenant"),
    ("SENTINEL_WORKSPACE_ID", "soc-workspace", "full ARM resource ID"),
    ("GRAPH_ENDPOINT", "http://graph.microsoft.com", "https URL"),
    ("LOGS_INGESTION_ENDPOINT", "ftp://x", "https URL"),
    ("SYNC_TENANTS", "{not json", "not valid JSON"),
    ("SYNC_TENANTS", json.dumps({T1: {"mode": "mirror"}}), "mode must be"),
    ("SYNC_TENANTS", json.dumps({T1: {"minSeverity": "critical"}}), "minSeverity"),
    ("SYNC_TENANTS", json.dumps({"99999999-9999-9999-9999-999999999999": {}}), "not in DEFENDER_TENANT_IDS"),
    ("SYNC_CONFLICT_POLICY", "newest", "SYNC_CONFLICT_POLICY must be one of"),
    ("SYNC_FANOUT", "fanout", "SYNC_FANOUT must be one of"),
    ("SYNC_OVERLAP_SECONDS", "two minutes", "must be a number"),
    ("GRAPH_MAX_REQUESTS_PER_MINUTE", "0", "between"),
    ("SYNC_OWNER_MAP", "[1]", "SYNC_OWNER_MAP"),
    ("SYNC_QUEUE", "Bad_Queue", "SYNC_QUEUE"),
    ("LOGS_DCR_IMMUTABLE_ID", "/subscriptions/x/dcr", "immutable ID"),
])
def test_invalid_values_are_named_with_a_fix(name: str, value: str, fragment: str) -> None:
    problems = problems_of(base_env(**{name: value}))
    assert any(name in p and fragment in p for p in problems), problems


def test_missing_required_settings_are_all_listed_at_once() -> None:
    problems = problems_of({})
    text = "\n".join(problems)
    for name in ("DEFENDER_TENANT_IDS", "LOGS_INGESTION_ENDPOINT", "LOGS_DCR_IMMUTABLE_ID", "SENTINEL_WORKSPACE_ID",
                 "AzureWebJobsStorage"):
        assert name in text


def test_secrets_never_appear_in_errors_or_repr() -> None:
    secret = "s3cr3t-value-that-must-not-leak-0123456789"
    env = base_env(DEFENDER_CLIENT_SECRET=secret, SYNC_CONFLICT_POLICY="bogus")
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert secret not in str(info.value)
    settings = load_settings(base_env(DEFENDER_CLIENT_SECRET=secret))
    assert secret not in repr(settings)
    assert "AccountName=x" not in repr(settings)


def test_multiple_tenants_need_the_multi_tenant_app() -> None:
    problems = problems_of(base_env(DEFENDER_CLIENT_ID=""))
    assert any("DEFENDER_CLIENT_ID is required" in p for p in problems)
    single = load_settings(base_env(DEFENDER_CLIENT_ID="", DEFENDER_TENANT_IDS=T1))
    assert single.defender_client_id is None


def test_only_one_credential_kind() -> None:
    problems = problems_of(base_env(DEFENDER_CLIENT_SECRET="x", DEFENDER_CLIENT_CERTIFICATE="-----BEGIN X"))
    assert any("Set only one" in p for p in problems)


def test_tenant_overrides_and_owner_map() -> None:
    env = base_env(SYNC_TENANTS=json.dumps({T2.upper(): {"name": "Fabrikam", "mode": "pull-only",
                                                         "minSeverity": "Medium",
                                                         "serviceSources": ["microsoftDefenderForEndpoint"]}}),
                   SYNC_OWNER_MAP=json.dumps({"Analyst@MSSP.com": "analyst@customer.com"}))
    s = load_settings(env)
    t2 = s.tenant(T2)
    assert t2 is not None and t2.name == "Fabrikam" and t2.mode == "pull-only" and not t2.writes_defender
    assert t2.mirrors and t2.min_severity == "medium"
    assert t2.service_sources == frozenset({"microsoftDefenderForEndpoint"})
    assert s.owner_map == {"analyst@mssp.com": "analyst@customer.com"}


def test_custom_authority_disables_instance_discovery() -> None:
    s = load_settings(base_env(AZURE_AUTHORITY_HOST="https://127.0.0.1:8443/"))
    assert s.authority_host == "https://127.0.0.1:8443"
    assert s.disable_instance_discovery is True
    gov = load_settings(base_env(AZURE_AUTHORITY_HOST="https://login.microsoftonline.us"))
    assert gov.disable_instance_discovery is False


def test_identity_based_storage() -> None:
    env = base_env(AzureWebJobsStorage="")
    env.pop("AzureWebJobsStorage")
    env.update({"AzureWebJobsStorage__accountName": "stsync", "AzureWebJobsStorage__credential": "managedidentity",
                "AzureWebJobsStorage__clientId": "55555555-5555-5555-5555-555555555555"})
    s = load_settings(env)
    assert s.storage.identity_based
    assert s.storage.table_uri == "https://stsync.table.core.windows.net"
    assert s.storage.queue_uri == "https://stsync.queue.core.windows.net"
    assert queue_connection_name(env) == "AzureWebJobsStorage"
    env["SYNC_STATE_STORAGE__tableServiceUri"] = "https://other.table.core.windows.net"
    assert load_settings(env).storage.table_uri == "https://other.table.core.windows.net"
    assert queue_connection_name(env) == "SYNC_STATE_STORAGE"


def test_fingerprint_changes_with_settings() -> None:
    a = settings_fingerprint(base_env())
    assert a == settings_fingerprint(base_env())
    assert a != settings_fingerprint(base_env(SYNC_FANOUT="queue"))


def test_federated_audience_follows_the_cloud() -> None:
    from sync.credentials import federated_scope

    assert federated_scope("https://login.microsoftonline.com") == "api://AzureADTokenExchange/.default"
    assert federated_scope("https://login.microsoftonline.us") == "api://AzureADTokenExchangeUSGov/.default"
    assert federated_scope("https://127.0.0.1:8443") == "api://AzureADTokenExchange/.default"


def test_service_sources_microsoft_added_later_load_and_unknown_ones_only_warn(
        caplog: pytest.LogCaptureFixture) -> None:
    # Graph's serviceSource enum is evolvable: microsoftThreatIntelligence and microsoftSecurityForAI are real values
    # (Graph metadata), and a member Microsoft adds tomorrow must not stop the app from starting.
    sources = ["microsoftThreatIntelligence", "MicrosoftSecurityForAI", "microsoftBrandNewProduct"]
    env = base_env(SYNC_TENANTS=json.dumps({T1: {"serviceSources": sources}}))
    with caplog.at_level("WARNING", logger="sync.settings"):
        s = load_settings(env)
    t1 = s.tenant(T1)
    assert t1 is not None
    assert t1.service_sources == frozenset({"microsoftThreatIntelligence", "microsoftSecurityForAI",
                                            "microsoftBrandNewProduct"})
    assert len(s.warnings) == 1 and "microsoftBrandNewProduct" in s.warnings[0]
    assert "serviceSources" in s.warnings[0] and "['microsoftBrandNewProduct']" in s.warnings[0]
    assert [r.getMessage() for r in caplog.records if r.name == "sync.settings"] == list(s.warnings)


def test_min_severity_stays_a_closed_set() -> None:
    # Severity is Graph's closed alertSeverity set: an unknown value is a typo, and a rank cannot be guessed for it.
    problems = problems_of(base_env(SYNC_TENANTS=json.dumps({T1: {"minSeverity": "critical"}})))
    assert any("minSeverity must be one of" in p for p in problems)
# ---------------------------------------------------------------------------------------------------------------
# Mirror target (defender-portal): the target, its rule and its request cap


def test_mirror_target_defaults_to_the_sentinel_api() -> None:
    s = load_settings(base_env())
    assert (s.mirror_target, s.mirror_rule_id, s.mirror_requests_per_minute) == ("sentinel-api", None, 25)


def test_defender_portal_reads_its_rule_and_cap() -> None:
    rule = "55555555-5555-5555-5555-55555555AAAA"
    s = load_settings(base_env(SYNC_MIRROR_TARGET="Defender-Portal", SYNC_MIRROR_RULE_ID=rule,
                               SYNC_MIRROR_REQUESTS_PER_MINUTE="30"))
    assert (s.mirror_target, s.mirror_rule_id, s.mirror_requests_per_minute) == \
        ("defender-portal", rule.lower(), 30)


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"SYNC_MIRROR_TARGET": "portal"}, "SYNC_MIRROR_TARGET must be one of sentinel-api, defender-portal"),
    ({"SYNC_MIRROR_TARGET": "defender-portal"}, "SYNC_MIRROR_RULE_ID is missing"),
    ({"SYNC_MIRROR_RULE_ID": "mirror-rule"}, "SYNC_MIRROR_RULE_ID must be the mirror analytics rule's"),
    ({"SYNC_MIRROR_REQUESTS_PER_MINUTE": "31"}, "SYNC_MIRROR_REQUESTS_PER_MINUTE must be between 1 and 30"),
    ({"SYNC_MIRROR_REQUESTS_PER_MINUTE": "0"}, "SYNC_MIRROR_REQUESTS_PER_MINUTE must be between 1 and 30"),
])
def test_bad_mirror_settings_are_named(overrides: dict[str, str], fragment: str) -> None:
    assert any(fragment in p for p in problems_of(base_env(**overrides))), problems_of(base_env(**overrides))


def test_ca_bundle_is_read_once_and_a_missing_file_is_named(tmp_path: Any) -> None:
    """The HTTP clients verify TLS with the bundle the settings read (REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE)."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    assert load_settings(base_env()).ca_bundle is None
    assert load_settings(base_env(CURL_CA_BUNDLE=str(bundle))).ca_bundle == str(bundle)
    assert load_settings(base_env(REQUESTS_CA_BUNDLE=str(bundle), CURL_CA_BUNDLE="/x")).ca_bundle == str(bundle)
    assert load_settings(base_env()).env_proxies is False
    assert load_settings(base_env(no_proxy="localhost")).env_proxies is True
    missing = str(tmp_path / "absent.pem")
    assert any("REQUESTS_CA_BUNDLE" in p and missing in p for p in problems_of(base_env(REQUESTS_CA_BUNDLE=missing)))
