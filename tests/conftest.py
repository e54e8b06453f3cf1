"""Shared pytest fixtures: TLS trust, Azurite, the emulator hub, and the app-settings helper.

- ``ca_bundle`` (session): the emulators' CA file; sets ``os.environ["REQUESTS_CA_BUNDLE"]`` for the session.
- ``azurite`` (session): a running Azurite's connection string (skips the test when node/Azurite is missing).
- ``table_guard`` (autouse): Table Storage's size and batch limits on every write (see ``table_guard.py``).
- ``storage`` (function): the same connection string after deleting every table and queue (a clean account).
- ``emulator_hub`` (session): the running :class:`~emulators.hub.EmulatorHub`.
- ``emulators`` (function): that hub, reset (world, faults, request log, Sentinel) before the test.
- ``world`` (function): ``emulators.world``.
- ``managed_identity_env`` (function): ``IDENTITY_ENDPOINT``/``IDENTITY_HEADER``/``AZURE_AUTHORITY_HOST`` set (via
  monkeypatch) so ``ManagedIdentityCredential``/``DefaultAzureCredential`` use the emulated App Service identity.
- ``app_settings(hub, azurite, tenants=[...], credential="secret", **overrides) -> dict[str, str]`` (importable:
  ``from conftest import app_settings``, or use the ``make_app_settings`` fixture) builds the Function app's
  settings against the emulators; ``apply_settings(monkeypatch, settings)`` puts them in ``os.environ``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parent.parent) not in sys.path:   # the repo root: `import emulators`, `import sync`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from azure.core.pipeline.transport import RequestsTransport
from table_guard import TableGuard

from emulators.azurite import Azurite
from emulators.certs import ensure_tls
from emulators.hub import EmulatorHub, World
from emulators.hub import app_settings as _app_settings

_CREDENTIAL_ENV = ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_CLIENT_CERTIFICATE_PATH",
                   "AZURE_FEDERATED_TOKEN_FILE", "AZURE_USERNAME", "AZURE_PASSWORD", "MSI_ENDPOINT", "MSI_SECRET",
                   "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT")


def app_settings(hub: Any, azurite: str | None, tenants: Any = (), *, credential: str = "secret",
                 **overrides: str | None) -> dict[str, str]:
    """Function app settings wired to the emulators (see :func:`emulators.hub.app_settings`)."""
    return _app_settings(hub, azurite, tenants, credential=credential, **overrides)


def apply_settings(monkeypatch: pytest.MonkeyPatch, settings: Mapping[str, str]) -> None:
    """Put ``settings`` into ``os.environ`` for one test (and clear stray azure-identity variables)."""
    for name in _CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(autouse=True)
def table_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[TableGuard]:
    """Every Table Storage write of every test is checked against the service's limits (Azurite checks none)."""
    guard = TableGuard()
    monkeypatch.setattr(RequestsTransport, "send", guard.wrap(RequestsTransport.send))
    yield guard
    assert not guard.violations, f"writes the Table service would refuse: {guard.violations[:3]}"


@pytest.fixture(scope="session")
def emulator_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session directory holding ``ca.pem``, the server key and ``endpoints.json``."""
    return tmp_path_factory.mktemp("emulators")


@pytest.fixture(scope="session")
def ca_bundle(emulator_state_dir: Path) -> Iterator[str]:
    """Path of the emulators' CA; ``REQUESTS_CA_BUNDLE`` points at it for the whole session."""
    files = ensure_tls(emulator_state_dir)
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(files.ca_pem)
    yield str(files.ca_pem)
    if previous is None:
        os.environ.pop("REQUESTS_CA_BUNDLE", None)
    else:
        os.environ["REQUESTS_CA_BUNDLE"] = previous


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    """Connection string of a session-wide Azurite (Blob, Queue, Table; in memory)."""
    if not Azurite.available():
        pytest.skip("Azurite is not installed (npm ci) or node is missing")
    instance = Azurite()
    connection = instance.start()
    try:
        yield connection
    finally:
        instance.stop()


@pytest.fixture
def storage(azurite: str) -> str:
    """Azurite's connection string with every table and queue deleted first."""
    from azure.data.tables import TableServiceClient
    from azure.storage.queue import QueueServiceClient

    tables = TableServiceClient.from_connection_string(azurite)
    for table in list(tables.list_tables()):
        tables.delete_table(table.name)
    queues = QueueServiceClient.from_connection_string(azurite)
    for queue in list(queues.list_queues()):
        queues.delete_queue(queue.name)
    return azurite


@pytest.fixture(scope="session")
def emulator_hub(ca_bundle: str, emulator_state_dir: Path) -> Iterator[EmulatorHub]:
    """The emulators (Entra + MSI, Graph, Logs Ingestion, Sentinel if present), started once per session."""
    hub = EmulatorHub()
    hub.start(emulator_state_dir)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def emulators(emulator_hub: EmulatorHub) -> EmulatorHub:
    """The session hub, reset to its start state (no customer tenants, apps, incidents, rows or faults)."""
    emulator_hub.reset()
    return emulator_hub


@pytest.fixture
def world(emulators: EmulatorHub) -> World:
    """The reset hub's :class:`~emulators.hub.World`."""
    return emulators.world


@pytest.fixture
def managed_identity_env(emulators: EmulatorHub, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of an App Service with the emulated system-assigned managed identity."""
    env = emulators.environ()
    apply_settings(monkeypatch, env)
    return env


@pytest.fixture
def make_app_settings(emulators: EmulatorHub, request: pytest.FixtureRequest) -> Callable[..., dict[str, str]]:
    """``make_app_settings(tenants=[...], credential="secret", storage=True, **overrides)``: app settings against
    the reset hub; ``storage=True`` (default) starts/cleans Azurite for ``AzureWebJobsStorage``."""

    def build(tenants: Any = (), *, credential: str = "secret", storage: bool = True,
              **overrides: str | None) -> dict[str, str]:
        connection = request.getfixturevalue("storage") if storage else None
        return app_settings(emulators, connection, tenants, credential=credential, **overrides)

    return build


@pytest.fixture
def one_tenant(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``one_tenant(name, seed, count, **settings)``: a tenant with generated incidents, the app configured for it."""

    def setup(name: str, seed: int, count: int, **overrides: str) -> tuple[Any, str]:
        world = emulators.world
        tenant = world.add_tenant(name=name)
        world.generate(seed, tenant, count)
        apply_settings(monkeypatch, make_app_settings([tenant], **overrides))
        return world, tenant

    return setup
