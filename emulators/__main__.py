"""``python -m emulators serve --state-dir DIR``: run every emulator as a process.

Writes ``DIR/ca.pem`` and ``DIR/endpoints.json`` (URLs, DCR ID, managed identity, the control API) and serves until
SIGTERM/SIGINT. With ``--tenants N`` it also creates N customer tenants with ``--incidents`` generated incidents each
and a multi-tenant app, and adds ``"appSettings"`` (the Function app's settings, see
:func:`emulators.hub.app_settings`) to ``endpoints.json``. ``--azurite`` also starts Azurite and puts its connection
string in ``AzureWebJobsStorage``. Prints ``READY <endpoints.json>`` on stdout once everything listens.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .azurite import Azurite
from .generator import make_tenants
from .hub import EmulatorHub, app_settings


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m emulators", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the emulators until stopped")
    serve.add_argument("--state-dir", required=True, type=Path, help="where ca.pem and endpoints.json go")
    serve.add_argument("--tenants", type=int, default=0, help="customer tenants to create and fill")
    serve.add_argument("--incidents", type=int, default=25, help="generated incidents per tenant")
    serve.add_argument("--seed", type=int, default=7, help="generator seed")
    serve.add_argument("--profile", default="realistic", choices=("realistic", "small", "bench"))
    serve.add_argument("--credential", default="secret",
                       choices=("secret", "certificate", "federated", "managed-identity"))
    serve.add_argument("--azurite", action="store_true", help="also start Azurite")
    serve.add_argument("--no-sentinel", action="store_true", help="do not start the Sentinel (ARM) emulator")
    serve.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    azurite = Azurite() if args.azurite else None
    hub = EmulatorHub(include_sentinel=not args.no_sentinel)
    try:
        connection = azurite.start() if azurite else None
        hub.start(args.state_dir)
        extra: dict[str, object] = {}
        if args.tenants:
            specs = make_tenants(args.seed, args.tenants)
            for spec in specs:
                hub.world.add_tenant(spec.tenant_id, spec.name, spec.domain)
                hub.world.generate(args.seed, spec.tenant_id, args.incidents, profile=args.profile)
            extra["tenants"] = [{"tenantId": s.tenant_id, "name": s.name} for s in specs]
            extra["appSettings"] = app_settings(hub, connection, [s.tenant_id for s in specs],
                                                credential=args.credential)
        if connection:
            extra["azureWebJobsStorage"] = connection
        path = hub.write_endpoints(extra)
        print(f"READY {path}", flush=True)
        stop.wait()
    finally:
        hub.stop()
        if azurite:
            azurite.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
