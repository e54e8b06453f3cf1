"""Table Storage costs behind each pull page, against Azurite: ``python -m bench.state_probe [--sizes N ...]``.

Fills one tenant's ``syncIncidents`` partition with :class:`sync.state.IncidentVersion` entities through
:meth:`sync.state.StateStore.save_versions` (50 per call, as one page), and at each size measures, for the newest 50
incident IDs:

- ``save_versions`` of 50 entities (one ``$batch`` transaction): CPU and wall per call;
- ``get_versions`` (RowKey ``or`` filters, 14 IDs per query): wall and CPU per page;
- 50 point reads (``get_entity``) one after another, and one RowKey range query, for comparison.

It shows whether a look-up costs time proportional to the incidents already stored (a partition scan).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from azure.data.tables import TableServiceClient  # noqa: E402

from emulators.azurite import Azurite  # noqa: E402
from sync.state import INCIDENTS, IncidentVersion, StateStore  # noqa: E402

STAMP = "2026-11-27T10:00:00.0000000Z"
FIRST_ID = 100_000


def _page(start: int) -> list[IncidentVersion]:
    """50 versions with two alerts each (the bench profile's typical incident)."""
    return [IncidentVersion(str(FIRST_ID + start + i), STAMP, {f"da{start + i}_{j}": STAMP for j in range(2)})
            for i in range(50)]


def probe(store: StateStore, sizes: list[int], tenant_id: str = "bench-tenant") -> None:
    """Grow the partition to each size and print the per-page costs."""
    stored = 0
    for size in sorted(sizes):
        cpu = wall = 0.0
        calls = 0
        while stored < size:
            t0, w0 = time.thread_time(), time.perf_counter()
            store.save_versions(tenant_id, _page(stored))
            cpu += time.thread_time() - t0
            wall += time.perf_counter() - w0
            calls += 1
            stored += 50
        print(f"{stored:,} versions stored")
        if calls:
            print(f"  save_versions(50): {cpu / calls * 1000:.1f} ms CPU, {wall / calls * 1000:.1f} ms wall per call")
        ids = [str(FIRST_ID + stored - 1 - i) for i in range(50)]
        walls, cpus = [], []
        for _ in range(5):
            t0, w0 = time.thread_time(), time.perf_counter()
            found = store.get_versions(tenant_id, ids)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.thread_time() - t0)
        assert len(found) == len(ids), "every version must be found"
        print(f"  get_versions(50) with RowKey 'or' filters: {statistics.median(walls) * 1000:.1f} ms wall, "
              f"{statistics.median(cpus) * 1000:.1f} ms CPU")
        table = store.table(INCIDENTS)
        t0, w0 = time.thread_time(), time.perf_counter()
        for incident_id in ids:
            table.get_entity(tenant_id, incident_id)
        print(f"  50 point reads in a row: {(time.perf_counter() - w0) * 1000:.1f} ms wall, "
              f"{(time.thread_time() - t0) * 1000:.1f} ms CPU")
        t0, w0 = time.thread_time(), time.perf_counter()
        rows = list(table.query_entities("PartitionKey eq @pk and RowKey ge @lo and RowKey le @hi",
                                         parameters={"pk": tenant_id, "lo": min(ids), "hi": max(ids)}))
        print(f"  one RowKey range query ({len(rows)} entities; only helps when a page's IDs are contiguous): "
              f"{(time.perf_counter() - w0) * 1000:.1f} ms wall, {(time.thread_time() - t0) * 1000:.1f} ms CPU")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.state_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000],
                        help="partition sizes (stored incident versions) to measure at")
    args = parser.parse_args(argv)
    if not Azurite.available():
        print("Azurite is not installed (run `npm ci`) or node is missing")
        return 2
    azurite = Azurite()
    try:
        store = StateStore(TableServiceClient.from_connection_string(azurite.start()))
        store.ensure_tables()
        probe(store, args.sizes)
    finally:
        azurite.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
