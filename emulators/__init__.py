"""HTTPS emulators of the Microsoft services the app calls, for tests and the demo.

Written from the published contracts in ``../shared/reference/``; the app's real SDK clients talk to them unmodified.
"""
