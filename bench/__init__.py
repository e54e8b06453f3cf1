"""Benchmarks that print figures (not tests).

- :mod:`bench.pull_bench`: ``python -m bench.pull_bench --incidents N``: the pull pipeline (Graph -> rows -> Logs
  Ingestion, state in Table Storage) against the local emulators and Azurite, with the app measured in a process of
  its own (:mod:`bench.pull_child`).
"""
