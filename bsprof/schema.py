"""The version of the store's schema, apart from the store.

The store migrates to it and refuses other versions; a run's environment record is stamped with it. Keeping
it here lets the environment record it without importing the store.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION"]

SCHEMA_VERSION = 1
"""Bump with an explicit migration in :mod:`bsprof.store` whenever the tables change."""
