"""Command line: ``python -m sync check [--settings local.settings.json] [--json] [--timeout SECONDS]``.

Runs the onboarding preflight (:mod:`sync.preflight`) from a shell with the app's settings: the environment, plus the
``Values`` of ``local.settings.json`` when that file exists. The environment wins: a value already set in the shell
overrides the file, so one setting can be tried without editing it. Exit code 0 when every check passed, 1 when a
check failed, 2 when the settings are invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _apply_local_settings(path: Path) -> int:
    """Copy the file's ``Values`` into ``os.environ`` where the environment has no value; returns how many."""
    data = json.loads(path.read_text(encoding="utf-8"))
    values = data.get("Values") if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise ValueError(f"{path} has no \"Values\" object")
    applied = 0
    for name, value in values.items():
        if isinstance(value, str) and value != "" and name not in os.environ:
            os.environ[name] = value   # azure-identity and requests read the process environment too
            applied += 1
    return applied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sync", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="onboarding preflight: consent, roles, permissions, rule, storage")
    check.add_argument("--settings", default="local.settings.json",
                       help="Functions local settings file whose Values fill in what the environment lacks "
                            "(default: ./local.settings.json, skipped when absent)")
    check.add_argument("--json", action="store_true", help="print the JSON answer of sync_check instead of a table")
    check.add_argument("--timeout", type=float, default=None, help="seconds each check may take")
    args = parser.parse_args(argv)

    from .context import AppContext
    from .preflight import DEFAULT_CHECK_SECONDS, MAX_CHECK_SECONDS, format_table, run_checks
    from .settings import SettingsError, load_settings

    path = Path(args.settings)
    try:
        if path.is_file():
            _apply_local_settings(path)
        elif args.settings != "local.settings.json":
            raise ValueError(f"{path} does not exist")
        settings = load_settings()
    except (ValueError, SettingsError) as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    seconds = args.timeout if args.timeout is not None else DEFAULT_CHECK_SECONDS
    if not 1 <= seconds <= MAX_CHECK_SECONDS:
        print(f"--timeout must be between 1 and {MAX_CHECK_SECONDS:g} seconds", file=sys.stderr)
        return 2
    report = run_checks(AppContext(settings), seconds)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_table(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
