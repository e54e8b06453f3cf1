"""The README's demo: the app's real entry point against the local emulators and Azurite.

1. starts Azurite and the HTTPS emulators (Entra, Graph, Logs Ingestion, Sentinel) and seeds two Defender tenants;
2. configures the app only through its app settings and runs ``defender_pull`` through ``function_app.py``;
3. prints what landed where (Log Analytics tables, Sentinel incidents, state);
4. plays an analyst who closes one incident in Sentinel as a true positive with a comment, delivers the webhook the
   way the Logic App would, and shows the change on the Defender side.

Run it with ``make demo`` (``SYNC_MIRROR_TARGET=sentinel-api``: the app creates each mirror through the API), or
``make demo TARGET=defender-portal`` (``python -m scripts.demo --target defender-portal``): the workspace is onboarded
to the unified Defender portal, the mirror analytics rule exists, and the app sends request rows instead; the demo
moves the rule's clock a minute at a time (the emulator's control API, as the tests do; nothing sleeps), then shows
the mirrors linked and the same round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import azure.functions as func  # noqa: E402
from azure.functions.timer import TimerRequest  # noqa: E402

from emulators.azurite import Azurite  # noqa: E402
from emulators.certs import ensure_tls  # noqa: E402
from emulators.hub import EmulatorHub, app_settings  # noqa: E402
from emulators.portal import AppClock  # noqa: E402

TABLES = ("DefenderIncidents_CL", "DefenderAlerts_CL", "DefenderEvidence_CL")
TARGETS = ("sentinel-api", "defender-portal")
MIRROR_RULE_ID = "0d3e5a1c-6a1b-4c2d-9e8f-00000000de30"


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text} " + "=" * max(0, 100 - len(text)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The README's demo against the local emulators.")
    parser.add_argument("--target", choices=TARGETS, default="sentinel-api",
                        help="SYNC_MIRROR_TARGET to demonstrate (default: sentinel-api)")
    target = parser.parse_args(argv).target
    state_dir = Path(tempfile.mkdtemp(prefix="defender-sync-demo-"))
    tls = ensure_tls(state_dir)
    os.environ["REQUESTS_CA_BUNDLE"] = str(tls.ca_pem)
    azurite = Azurite()
    hub = EmulatorHub()
    heading("Starting Azurite and the emulators (Entra ID, Graph, Logs Ingestion, Sentinel)")
    connection = azurite.start()
    endpoints = hub.start(state_dir)
    say(f"Graph       {endpoints.graph}")
    say(f"Entra       {endpoints.authority_host}")
    say(f"Ingestion   {endpoints.ingestion}  (DCR {endpoints.dcr_immutable_id})")
    say(f"Sentinel    {endpoints.arm}{endpoints.sentinel_workspace_id}")
    try:
        return run(hub, connection, target)
    finally:
        hub.stop()
        azurite.stop()


def run(hub: EmulatorHub, connection: str, target: str = "sentinel-api") -> int:
    world = hub.world
    contoso = world.add_tenant(name="Contoso", domain="contoso.onmicrosoft.com")
    fabrikam = world.add_tenant(name="Fabrikam", domain="fabrikam.onmicrosoft.com")
    world.generate(7, contoso, 25)
    world.generate(8, fabrikam, 15)
    portal = target == "defender-portal"
    extra: dict[str, str] = {}
    if portal:
        # The workspace is onboarded to the unified Defender portal and the infra deployed the mirror rule.
        world.portal.enable()
        world.portal.put_rule(MIRROR_RULE_ID)
        extra = {"SYNC_MIRROR_TARGET": target, "SYNC_MIRROR_RULE_ID": MIRROR_RULE_ID,
                 # A short run budget: a run sends what the pace allows and never waits a real minute for more.
                 "SYNC_TIME_BUDGET_SECONDS": "30"}
    settings = app_settings(hub, connection, [contoso, fabrikam], credential="federated",
                            SYNC_TENANTS=json.dumps({contoso: {"name": "Contoso"},
                                                     fabrikam: {"name": "Fabrikam", "mode": "pull-only"}}), **extra)
    os.environ.update(settings)
    say(f"Mirror target: {target}" + (" (workspace in the unified Defender portal; mirror rule "
                                      f"{MIRROR_RULE_ID})" if portal else ""))
    say(f"Seeded 2 Defender tenants: Contoso ({contoso}, mode sync) with 25 incidents, Fabrikam ({fabrikam}, "
        "mode pull-only) with 15.")
    say("The app authenticates to each tenant's Graph as the multi-tenant app, with its managed identity as the "
        "federated credential (no secret).")

    import function_app

    functions = {f.get_function_name(): f.get_user_function() for f in function_app.app.get_functions()}
    heading("Running defender_pull through function_app.py (timer trigger)")
    clock = AppClock() if portal else None
    if clock is not None:
        from sync.context import get_context

        ctx = get_context()
        ctx.clock, ctx.sleep = clock, clock.sleep
    functions["defender_pull"](TimerRequest(past_due=False))

    heading("What landed where")
    for table in TABLES:
        rows = world.rows(table)
        per_tenant = Counter(r["DefenderTenantId"] for r in rows)
        say(f"Log Analytics {table:<22} {len(rows):>6} rows   Contoso {per_tenant[contoso]:>5}   "
            f"Fabrikam {per_tenant[fabrikam]:>5}")
    sentinel = hub.sentinel
    assert sentinel is not None
    if clock is not None:
        portal_rounds(hub, functions, clock)
    else:
        say(f"Sentinel incidents created: {len(sentinel.all_incidents())} (one per Defender incident, named by a "
            "GUID derived from tenant + incident ID)")
    status = http(functions, "sync_status", "GET")
    for tenant in status["tenants"]:
        say(f"sync_status  {tenant['name']:<9} cursor {tenant['cursor']}  lag {tenant['lagSeconds']} s  "
            f"last run {tenant['lastRun']['outcome']}  dead letters {tenant['deadLetters']}")

    incident = pick_open_incident(world, contoso)
    if incident is None:
        say("No open Contoso incident to close; the round trip is skipped.")
        return 0
    name = find_mirror(sentinel.all_incidents(), incident["id"], "tenant:Contoso")
    heading(f"Round trip: Defender incident {incident['id']} ⇄ Sentinel incident {name}")
    before = sentinel.get(name)["properties"]
    say(f"Sentinel before: status {before['status']}, title {before['title']!r}")
    say(f"Defender before: status {incident['status']}, classification {incident.get('classification')}, "
        f"determination {incident.get('determination')}")
    sentinel.analyst_update(name, status="Closed", classification="TruePositive",
                            classification_reason="SuspiciousActivity",
                            classification_comment="Confirmed by the SOC", updated_by="analyst@mssp.com")
    sentinel.analyst_comment(name, "Contained: host isolated and credentials reset.", author="analyst@mssp.com")
    say("An analyst closed it in Sentinel as TruePositive / SuspiciousActivity and added a comment.")
    answer = http(functions, "sentinel_webhook", "POST", sentinel.trigger_body(name))
    say(f"Webhook (the Logic App's POST of @triggerBody()) answered: result {answer['result']}, "
        f"Defender changes {json.dumps(answer['changes']['defender'])}, comments to Defender "
        f"{answer['comments']['toDefender']}")
    after = world.get_incident(contoso, incident["id"])
    say(f"Defender after:  status {after['status']}, classification {after.get('classification')}, "
        f"determination {after.get('determination')}")
    for comment in after.get("comments") or []:
        say(f"Defender comment: {comment.get('comment', '').splitlines()[0][:110]}")
    again = http(functions, "sentinel_webhook", "POST", sentinel.trigger_body(name))
    say(f"The same webhook delivered again: result {again['result']}, changes {json.dumps(again['changes'])}, "
        f"comments {json.dumps(again['comments'])}")
    ok = after["status"] == "resolved" and after.get("classification") == "truePositive"
    say()
    say("Round trip OK." if ok else "Round trip FAILED: Defender does not show the closure.")
    return 0 if ok else 1


def portal_rounds(hub: EmulatorHub, functions: dict[str, Any], clock: AppClock) -> None:
    """defender-portal: a minute passes (the rule runs over the rows of that minute), the app links what the rule
    made and sends what the pace allows, until every request is linked; then the figures."""
    world, sentinel = hub.world, hub.sentinel
    assert sentinel is not None
    say(f"Request rows sent to DefenderMirrorRequests_CL by the first run: "
        f"{len(world.rows('DefenderMirrorRequests_CL'))} (at most 25 a minute, SYNC_MIRROR_REQUESTS_PER_MINUTE)")
    for minute in range(1, 6):
        runs = world.portal.advance(minutes=1)
        clock.sleep(60)
        made = sum(len(r.incidents) for r in runs)
        body = http(functions, "sync_run", "POST", {})
        requests = body["mirrorRequests"]
        say(f"minute {minute}: the mirror rule ran over {sum(r.rows for r in runs)} row(s) and made {made} "
            f"incident(s); the next run linked {requests['linked']}, sent {requests['sent']} more request(s), "
            f"{requests['waiting']} waiting; rule {requests['rule']}")
        if requests["waiting"] == 0 and requests["sent"] == 0 and made == 0:
            break
    status = http(functions, "sync_status", "GET")
    waiting = sum(t.get("mirrorRequestsWaiting", 0) for t in status["tenants"])
    rows = world.rows("DefenderMirrorRequests_CL")
    from sync.context import get_context

    state = get_context().state
    linked = sum(1 for r in rows if (state.get_link(r["DefenderTenantId"], r["IncidentId"]) or {}).get("state")
                 == "active")
    created = sum(1 for w in sentinel.write_log if w.kind == "incident" and w.status == 201)
    say(f"Requests sent: {len(rows)}   mirrors linked: {linked}   waiting: {waiting}   incidents created through "
        f"the API: {created}   invisible in the Defender portal: {len(world.portal.invisible_incidents())}   "
        f"largest rule run: {max((r.rows for r in world.portal.runs), default=0)} rows (summary alerts: "
        f"{sum(1 for r in world.portal.runs if r.summary)})")
    say(f"sync_status mirrorRule: {json.dumps(status.get('mirrorRule'))}")


def pick_open_incident(world: Any, tenant: str) -> dict[str, Any] | None:
    for incident_id in world.incident_ids(tenant):
        incident = world.get_incident(tenant, incident_id)
        if incident and incident.get("status") in ("active", "inProgress"):
            return dict(incident)
    return None


def find_mirror(incidents: list[dict[str, Any]], incident_id: str, tenant_label: str) -> str:
    for item in incidents:
        props = item["properties"]
        labels = {label["labelName"] for label in props.get("labels", [])}
        if tenant_label in labels and f"Defender XDR incident {incident_id}" in props.get("description", ""):
            return str(item["name"])
    raise SystemExit(f"no Sentinel incident mirrors Defender incident {incident_id}")


def http(functions: dict[str, Any], name: str, method: str, body: Any = None) -> Any:
    payload = b"" if body is None else json.dumps(body).encode("utf-8")
    request = func.HttpRequest(method=method, url=f"https://localhost/api/{name}", headers={
        "content-type": "application/json"}, params={}, route_params={}, body=payload)
    response = functions[name](request)
    return json.loads(response.get_body())


if __name__ == "__main__":
    raise SystemExit(main())
