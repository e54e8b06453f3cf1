"""Every Graph v1.0 evidence type fills the join-key columns of DefenderEvidence_CL that identify it.

The type list comes from Graph's metadata (tests/fixtures/real-payloads/graph/msgraph-metadata_...json): a type added
there and not listed here fails the first test, so the mapping is looked at whenever Microsoft extends it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sync.rows import evidence_rows, flatten_evidence, load_columns

METADATA = (Path(__file__).parent / "fixtures" / "real-payloads" / "graph"
            / "msgraph-metadata_v1.0_security-types-and-enums.json")
KEY_COLUMNS = frozenset(flatten_evidence({}))
UA = {"accountName": "bob", "domainName": "CONTOSO", "userSid": "S-1-5-21-1-2-3-1001",
      "azureAdUserId": "aa0a0a0a-0000-4000-8000-000000000001", "userPrincipalName": "bob@contoso.com"}
UA_KEYS = {"AccountName": "bob", "AccountDomain": "CONTOSO", "AccountSid": "S-1-5-21-1-2-3-1001",
           "AccountObjectId": "aa0a0a0a-0000-4000-8000-000000000001", "AccountUpn": "bob@contoso.com"}
DEVICE = {"mdeDeviceId": "mde-1", "deviceDnsName": "host-1.contoso.com", "hostName": "host-1"}
AZ = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/sa"
NS = {"name": "prod", "cluster": {"name": "aks-1"}}

#: evidence type -> (the evidence's own properties, the key columns it must fill with their values)
EVIDENCE: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "activeDirectoryDomainEvidence": ({"activeDirectoryDomainName": "corp.contoso.com", "trustedDomains": []},
                                      {"DomainName": "corp.contoso.com"}),
    "aiAgentEvidence": ({"agentId": "agent-7", "agentName": "HR bot", "hostingPlatformType": "copilotStudio"},
                        {"ResourceId": "agent-7", "ResourceName": "HR bot"}),
    "amazonResourceEvidence": ({"amazonAccountId": "1234", "amazonResourceId": "arn:aws:s3:::b",
                                "resourceName": "b", "resourceType": "S3"},
                               {"ResourceId": "arn:aws:s3:::b", "ResourceName": "b"}),
    "analyzedMessageEvidence": ({"networkMessageId": "nmid-1", "internetMessageId": "<m@x>",
                                 "recipientEmailAddress": "alice@contoso.com", "senderIp": "198.51.100.1",
                                 "p1Sender": {"emailAddress": "evil@bad.example"}},
                                {"NetworkMessageId": "nmid-1", "MailboxAddress": "alice@contoso.com",
                                 "IpAddress": "198.51.100.1", "SenderAddress": "evil@bad.example"}),
    "azureResourceEvidence": ({"resourceId": AZ, "resourceName": "sa", "resourceType": "Storage"},
                              {"ResourceId": AZ, "ResourceName": "sa"}),
    "blobContainerEvidence": ({"name": "c1", "url": "https://sa.blob.core.windows.net/c1",
                               "storageResource": {"resourceId": AZ}},
                              {"ResourceName": "c1", "Url": "https://sa.blob.core.windows.net/c1",
                               "ResourceId": AZ}),
    "blobEvidence": ({"name": "f.bin", "url": "https://sa.blob.core.windows.net/c1/f.bin", "etag": "0x1",
                      "fileHashes": [{"algorithm": "sha256", "value": "b" * 64}, {"algorithm": "md5",
                                                                                   "value": "c" * 32}],
                      "blobContainer": {"name": "c1"}},
                     {"ResourceName": "f.bin", "Url": "https://sa.blob.core.windows.net/c1/f.bin", "Sha256": "b" * 64,
                      "Md5": "c" * 32}),
    "cloudApplicationEvidence": ({"appId": 11161, "displayName": "Office 365", "instanceId": 0, "saasAppId": 11161},
                                 {"AppId": "11161", "AppName": "Office 365"}),
    "cloudLogonRequestEvidence": ({"requestId": "req-1"}, {"RequestId": "req-1"}),
    "cloudLogonSessionEvidence": ({"account": {"userAccount": UA}, "deviceName": "laptop-1", "sessionId": "s-1",
                                   "browser": "Edge"},
                                  {**UA_KEYS, "DeviceName": "laptop-1", "SessionId": "s-1"}),
    "containerEvidence": ({"containerId": "c0ffee", "name": "web", "image": {"imageId": "img"},
                           "pod": {"name": "web-1"}},
                          {"ResourceId": "c0ffee", "ResourceName": "web"}),
    "containerImageEvidence": ({"imageId": "contoso.azurecr.io/web@sha256:1", "registry": {"registry": "r"}},
                               {"ResourceId": "contoso.azurecr.io/web@sha256:1"}),
    "containerRegistryEvidence": ({"registry": "contoso.azurecr.io"}, {"ResourceName": "contoso.azurecr.io"}),
    "deviceEvidence": ({**DEVICE, "lastIpAddress": "10.0.0.5", "vmMetadata": {"resourceId": "/subscriptions/s/vm"}},
                       {"DeviceId": "mde-1", "DeviceName": "host-1.contoso.com", "IpAddress": "10.0.0.5",
                        "ResourceId": "/subscriptions/s/vm"}),
    "dnsEvidence": ({"domainName": "bad.example", "ipAddresses": [{"ipAddress": "203.0.113.9"}],
                     "hostIpAddress": {"ipAddress": "10.0.0.5"}, "dnsServerIp": {"ipAddress": "10.0.0.1"}},
                    {"DomainName": "bad.example", "IpAddress": "203.0.113.9"}),
    "fileEvidence": ({"mdeDeviceId": "mde-1", "fileDetails": {"fileName": "e.exe", "filePath": "C:\\t",
                                                              "sha1": "a" * 40, "sha256": "b" * 64}},
                     {"DeviceId": "mde-1", "FileName": "e.exe", "FilePath": "C:\\t", "Sha1": "a" * 40,
                      "Sha256": "b" * 64}),
    "fileHashEvidence": ({"algorithm": "sha1", "value": "a" * 40}, {"Sha1": "a" * 40}),
    "gitHubOrganizationEvidence": ({"orgId": "o-1", "login": "contoso", "webUrl": "https://github.com/contoso",
                                    "displayName": "Contoso"},
                                   {"ResourceId": "o-1", "Url": "https://github.com/contoso"}),
    "gitHubRepoEvidence": ({"repoId": "r-1", "baseUrl": "https://github.com/contoso/app", "login": "app",
                            "owner": "contoso"},
                           {"ResourceId": "r-1", "Url": "https://github.com/contoso/app"}),
    "gitHubUserEvidence": ({"userId": "u-1", "login": "octocat", "email": "o@contoso.com", "name": "Octo Cat",
                            "webUrl": "https://github.com/octocat"},
                           {"AccountName": "octocat", "Url": "https://github.com/octocat"}),
    "googleCloudResourceEvidence": ({"fullResourceName": "//compute.googleapis.com/projects/p/instances/i",
                                     "resourceName": "i", "projectId": "p"},
                                    {"ResourceId": "//compute.googleapis.com/projects/p/instances/i",
                                     "ResourceName": "i"}),
    "hostLogonSessionEvidence": ({"account": {"userAccount": UA}, "host": DEVICE, "sessionId": "0x3e7"},
                                 {**UA_KEYS, "DeviceId": "mde-1", "DeviceName": "host-1.contoso.com",
                                  "SessionId": "0x3e7"}),
    "ioTDeviceEvidence": ({"deviceId": "iot-1", "deviceName": "plc-1", "ipAddress": {"ipAddress": "10.1.1.1"},
                           "ioTHub": {"resourceId": "/subscriptions/s/iothub"}, "macAddress": "00:11"},
                          {"DeviceId": "iot-1", "DeviceName": "plc-1", "IpAddress": "10.1.1.1",
                           "ResourceId": "/subscriptions/s/iothub"}),
    "ipEvidence": ({"ipAddress": "203.0.113.7", "countryLetterCode": "NL"}, {"IpAddress": "203.0.113.7"}),
    "kubernetesClusterEvidence": ({"name": "aks-1", "cloudResource": {"resourceId": "/subscriptions/s/aks"},
                                   "platform": "aks"},
                                  {"ResourceName": "aks-1", "ResourceId": "/subscriptions/s/aks"}),
    "kubernetesControllerEvidence": ({"name": "web-deploy", "namespace": NS, "type": "Deployment"},
                                     {"ResourceName": "web-deploy"}),
    "kubernetesNamespaceEvidence": ({**NS, "labels": {}}, {"ResourceName": "prod"}),
    "kubernetesPodEvidence": ({"name": "web-1", "namespace": NS, "podIp": {"ipAddress": "10.244.0.7"}},
                              {"ResourceName": "web-1", "IpAddress": "10.244.0.7"}),
    "kubernetesSecretEvidence": ({"name": "db-pass", "namespace": NS, "secretType": "Opaque"},
                                 {"ResourceName": "db-pass"}),
    "kubernetesServiceAccountEvidence": ({"name": "default", "namespace": NS}, {"ResourceName": "default"}),
    "kubernetesServiceEvidence": ({"name": "web-svc", "namespace": NS, "clusterIP": {"ipAddress": "10.0.0.10"}},
                                  {"ResourceName": "web-svc", "IpAddress": "10.0.0.10"}),
    "mailClusterEvidence": ({"networkMessageIds": ["n1", "n2"], "clusterBy": "Subject", "clusterByValue": "x",
                             "emailCount": 2, "urn": "urn:1"},
                            {"NetworkMessageIds": ["n1", "n2"]}),
    "mailboxConfigurationEvidence": ({"mailboxPrimaryAddress": "a@contoso.com", "upn": "a@contoso.com",
                                      "externalDirectoryObjectId": "aa0a0a0a-0000-4000-8000-000000000002",
                                      "configurationType": "mailForwardingRule"},
                                     {"MailboxAddress": "a@contoso.com", "AccountUpn": "a@contoso.com",
                                      "AccountObjectId": "aa0a0a0a-0000-4000-8000-000000000002"}),
    "mailboxEvidence": ({"primaryAddress": "bob@contoso.com", "displayName": "Bob", "userAccount": UA},
                        {**UA_KEYS, "MailboxAddress": "bob@contoso.com"}),
    "malwareEvidence": ({"name": "Trojan:Win32/Wacatac", "category": "Trojan", "files": [], "processes": []},
                        {"MalwareName": "Trojan:Win32/Wacatac"}),
    "networkConnectionEvidence": ({"destinationAddress": {"ipAddress": "203.0.113.8"}, "destinationPort": 443,
                                   "sourceAddress": {"ipAddress": "10.0.0.5"}, "protocol": "tcp"},
                                  {"IpAddress": "203.0.113.8"}),
    "nicEvidence": ({"ipAddress": {"ipAddress": "10.0.0.6"}, "macAddress": "00:11"}, {"IpAddress": "10.0.0.6"}),
    "oauthApplicationEvidence": ({"appId": "00000003-0000-0000-c000-000000000000", "displayName": "Graph app",
                                  "objectId": "obj-1", "publisher": "Contoso"},
                                 {"AppId": "00000003-0000-0000-c000-000000000000", "AppName": "Graph app"}),
    "processEvidence": ({"mdeDeviceId": "mde-1", "processId": 4242, "processCommandLine": "e.exe -x",
                         "imageFile": {"fileName": "e.exe", "filePath": "C:\\t", "sha1": "a" * 40},
                         "userAccount": UA},
                        {**UA_KEYS, "DeviceId": "mde-1", "ProcessId": 4242, "ProcessCommandLine": "e.exe -x",
                         "FileName": "e.exe", "FilePath": "C:\\t", "Sha1": "a" * 40}),
    "registryKeyEvidence": ({"registryKey": "SYSTEM\\CONTROLSET001", "registryHive": "HKEY_LOCAL_MACHINE"},
                            {"RegistryKey": "HKEY_LOCAL_MACHINE\\SYSTEM\\CONTROLSET001"}),
    "registryValueEvidence": ({"mdeDeviceId": "mde-1", "registryKey": "HKEY_CURRENT_USER\\Run",
                               "registryHive": "HKEY_CURRENT_USER", "registryValueName": "evil",
                               "registryValue": "e.exe"},
                              {"DeviceId": "mde-1", "RegistryKey": "HKEY_CURRENT_USER\\Run",
                               "RegistryValueName": "evil"}),
    "sasTokenEvidence": ({"storageResource": {"resourceId": AZ}, "signatureHash": "h", "permissions": ["r"]},
                         {"ResourceId": AZ}),
    "securityGroupEvidence": ({"sid": "S-1-5-21-1-2-3-512", "securityGroupId": "grp-1",
                               "activeDirectoryObjectGuid": "0a0a0a0a-0000-4000-8000-000000000003",
                               "displayName": "Domain Admins"},
                              {"AccountSid": "S-1-5-21-1-2-3-512", "AccountObjectId": "grp-1"}),
    "servicePrincipalEvidence": ({"appId": "app-9", "servicePrincipalName": "ci-deployer",
                                  "servicePrincipalObjectId": "sp-obj-9", "tenantId": "t"},
                                 {"AppId": "app-9", "AppName": "ci-deployer", "AccountObjectId": "sp-obj-9"}),
    "submissionMailEvidence": ({"networkMessageId": "nmid-2", "recipient": "bob@contoso.com",
                                "sender": "evil@bad.example", "senderIp": "198.51.100.2", "submissionId": "sub"},
                               {"NetworkMessageId": "nmid-2", "MailboxAddress": "bob@contoso.com",
                                "SenderAddress": "evil@bad.example", "IpAddress": "198.51.100.2"}),
    "teamsMessageEvidence": ({"messageId": "1700000000000", "senderFromAddress": "evil@bad.example",
                              "senderIP": "198.51.100.3", "recipients": ["bob@contoso.com"], "urls": []},
                             {"NetworkMessageId": "1700000000000", "SenderAddress": "evil@bad.example",
                              "IpAddress": "198.51.100.3"}),
    "urlEvidence": ({"url": "https://bad.example/p"}, {"Url": "https://bad.example/p"}),
    "userEvidence": ({"userAccount": UA, "stream": None}, UA_KEYS),
}


def _graph_evidence_types() -> list[str]:
    return list(json.loads(METADATA.read_text(encoding="utf-8"))["evidenceTypes"])


def test_the_list_covers_every_evidence_type_of_graph_v1() -> None:
    assert sorted(EVIDENCE) == sorted(_graph_evidence_types())
    assert len(EVIDENCE) == 48


def test_key_columns_are_declared_columns() -> None:
    assert set(load_columns("DefenderEvidence_CL")) >= KEY_COLUMNS


@pytest.mark.parametrize("kind", sorted(EVIDENCE))
def test_each_evidence_type_fills_its_key_columns(kind: str) -> None:
    fields, expected = EVIDENCE[kind]
    assert expected, f"{kind} must fill at least one key column"
    item = {"@odata.type": f"#microsoft.graph.security.{kind}", "verdict": "suspicious", **fields}
    alert = {"id": "a1", "incidentId": "1", "lastUpdateDateTime": "2026-01-01T00:00:00Z", "evidence": [item]}
    (row,) = evidence_rows(alert, incident_id="1", tenant_id="t", tenant_name="T",
                           read_at=datetime(2026, 1, 1, tzinfo=UTC))
    filled = {name: row[name] for name in KEY_COLUMNS if name in row}
    assert filled == expected
    assert row["EvidenceType"] == kind
