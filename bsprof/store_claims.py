"""Trial claims: how concurrent sweeps of one run split its trials in the store (part of :class:`~bsprof.store.Store`).

A sweep *claims* a trial (a row in ``claims``, taken in a ``BEGIN IMMEDIATE`` transaction) before running it; the
claim is a lease that its sweep renews while it runs, so a killed sweep's claims expire after :data:`CLAIM_LEASE_S`
(at once when its process, on this host, is gone) and another sweep may take them. A trial is named by its key
(:meth:`~bsprof.engine.trial.TrialSpec.key`: kind, batch size, seed, lr, repeat) within its run, in one
``WHERE`` clause (:data:`_KEY_WHERE`) shared by every statement here.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

__all__ = ["CLAIM_LEASE_S", "FINISHED", "ClaimsMixin", "TrialKey"]

FINISHED = ("ok", "oom", "diverged", "budget_exhausted")
"""Trial statuses that need not run again ("error" trials are retried on resume)."""

CLAIM_LEASE_S = 60.0
"""Seconds a trial claim lasts unless its sweep renews it (a killed sweep's claims expire after this)."""

TrialKey = tuple[str, int, int, float, int]
"""A trial's key within its run: kind, batch size, seed, lr, repeat (:meth:`TrialSpec.key`)."""

_CLAIMS = """CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT NOT NULL, kind TEXT NOT NULL, batch_size INTEGER NOT NULL, seed INTEGER NOT NULL,
    lr REAL NOT NULL, repeat INTEGER NOT NULL, owner TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (run_id, kind, batch_size, seed, lr, repeat)
)"""

_KEY_WHERE = "run_id=? AND kind=? AND batch_size=? AND seed=? AND abs(lr - ?) < 1e-12 AND repeat=?"
"""One trial of one run (its lr within 1e-12: keys carry lr rounded to 12 digits); parameters: :func:`_key_args`."""


def _key_args(run_id: str, key: TrialKey) -> tuple[str, str, int, int, float, int]:
    """The parameters of :data:`_KEY_WHERE`, in its order."""
    return (run_id, *key)


class ClaimsMixin:
    """The claims methods of :class:`~bsprof.store.Store` (its connection and its transaction discipline)."""

    _conn: sqlite3.Connection

    if TYPE_CHECKING:

        def transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def claim_trial(self, run_id: str, key: TrialKey, owner: str, lease_s: float = CLAIM_LEASE_S) -> bool:
        """Claim the trial ``key`` (:meth:`TrialSpec.key`) of ``run_id`` for ``owner``, atomically.

        Returns:
            ``False`` when the trial is already finished in the store or another owner holds an unexpired
            claim on it; otherwise the claim is taken (or renewed) until ``now + lease_s`` (s) and ``True``.
        """
        args = _key_args(run_id, key)
        now = time.time()
        with self.transaction():
            self._conn.execute(_CLAIMS)
            finished = self._conn.execute(
                f"SELECT 1 FROM trials WHERE {_KEY_WHERE} AND status IN ({','.join('?' * len(FINISHED))})",
                (*args, *FINISHED),
            ).fetchone()
            if finished:
                return False
            holder = self._conn.execute(f"SELECT owner, expires_at FROM claims WHERE {_KEY_WHERE}", args).fetchone()
            if holder and holder[0] != owner and holder[1] > now and _owner_may_be_alive(holder[0]):
                return False
            self._conn.execute(f"DELETE FROM claims WHERE {_KEY_WHERE}", args)
            self._conn.execute(
                "INSERT INTO claims(run_id, kind, batch_size, seed, lr, repeat, owner, expires_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (*args, owner, now + lease_s),
            )
        return True

    def renew_claims(self, owner: str, lease_s: float = CLAIM_LEASE_S) -> None:
        """Extend every claim of ``owner`` to ``now + lease_s`` (s)."""
        with self.transaction():
            self._conn.execute(_CLAIMS)
            self._conn.execute("UPDATE claims SET expires_at=? WHERE owner=?", (time.time() + lease_s, owner))

    def release_claim(self, run_id: str, key: TrialKey, owner: str) -> None:
        """Give up ``owner``'s claim on one trial (it is stored)."""
        with self.transaction():
            self._conn.execute(_CLAIMS)
            self._conn.execute(f"DELETE FROM claims WHERE {_KEY_WHERE} AND owner=?", (*_key_args(run_id, key), owner))

    def release_claims(self, owner: str) -> None:
        """Give up every claim of ``owner`` (its trials are stored, or its sweep is ending)."""
        with self.transaction():
            self._conn.execute(_CLAIMS)
            self._conn.execute("DELETE FROM claims WHERE owner=?", (owner,))


def _owner_may_be_alive(owner: str) -> bool:
    """Whether the sweep that holds a claim may still be running: ``False`` only when its owner string
    (``host:pid:token``, :class:`~bsprof.engine.sweep` sweeps) names this host and a process that no longer
    exists, so a sweep killed with ``kill -9`` gives its claims up at once instead of after the lease."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
