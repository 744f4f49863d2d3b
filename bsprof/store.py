"""The results store: one SQLite file holding runs, trials and learning curves.

* A **run** is a sweep configuration (workload, kind, device, precision, timing...) identified by the hash
  of that configuration, plus the environment it ran in (versions, device, host, git commit).
  Re-running the same configuration resumes the latest run with that hash; ``fresh=True`` starts a new one.
* A **trial** row is written in one transaction when the trial ends, whatever its status. The pair
  (run, kind, batch size, seed, lr, repeat) is unique, so a resumed or concurrent sweep never duplicates
  a trial. Raw block timings are stored with the derived metrics.

Concurrency: WAL journal and a busy timeout, so several processes can write one store; each trial is a
single short transaction, and ``INSERT ... ON CONFLICT DO NOTHING`` keeps the first writer's trial.
Concurrent sweeps of one run split the work by claiming trials before running them: the claims methods live
in :mod:`bsprof.store_claims` (:class:`~bsprof.store_claims.ClaimsMixin`), on this store's connection.

Size (about 500 lines, above the ~400 guideline): schema, run identity, trial writes and reads share one connection
and one transaction discipline.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bsprof.errors import BadInput, BsprofError
from bsprof.files import WriteFailed
from bsprof.schema import SCHEMA_VERSION
from bsprof.store_claims import CLAIM_LEASE_S, FINISHED, ClaimsMixin

if TYPE_CHECKING:
    from bsprof.engine.trial import TrialResult, TrialSpec

__all__ = ["CLAIM_LEASE_S", "DEFAULT_STORE", "SCHEMA_VERSION", "RunRecord", "Store", "config_hash"]

DEFAULT_STORE = Path("reports") / "bsprof.db"
BUSY_TIMEOUT_S = 60.0
"""How long (s) opening or writing the store waits for another process's lock before it gives up."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    workload TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    environment_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    workload TEXT NOT NULL,
    kind TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    lr REAL NOT NULL,
    repeat INTEGER NOT NULL DEFAULT 0,
    phase TEXT NOT NULL DEFAULT 'main',
    status TEXT NOT NULL,
    device TEXT NOT NULL,
    device_name TEXT,
    error TEXT,
    started_at REAL,
    duration_s REAL,
    metrics_json TEXT NOT NULL,
    reasons_json TEXT NOT NULL,
    step_times_json TEXT,
    extra_json TEXT NOT NULL,
    UNIQUE (run_id, kind, batch_size, seed, lr, repeat)
);
CREATE TABLE IF NOT EXISTS curves (
    trial_id INTEGER NOT NULL REFERENCES trials(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    row_json TEXT NOT NULL,
    PRIMARY KEY (trial_id, idx)
);
CREATE TABLE IF NOT EXISTS max_batch (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    workload TEXT NOT NULL,
    device TEXT NOT NULL,
    config_json TEXT NOT NULL,
    environment_json TEXT NOT NULL,
    max_batch_size INTEGER,
    first_oom_batch_size INTEGER,
    tried_json TEXT NOT NULL
);
"""


def config_hash(config: dict[str, Any]) -> str:
    """A stable hex digest of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _json(value: Any) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), sort_keys=True, default=str)


@dataclass(frozen=True)
class RunRecord:
    """A run as stored."""

    run_id: str
    created_at: float
    workload: str
    config_hash: str
    config: dict[str, Any]
    environment: dict[str, Any]


class Store(ClaimsMixin):
    """A bsprof SQLite store.

    Args:
        path: The database file.
        create: Create the file (and its folder) if missing; otherwise a missing file is bad input.
    """

    def __init__(self, path: str | Path = DEFAULT_STORE, *, create: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise BadInput(f"store not found: {self.path}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BadInput(f"cannot create the store's folder {self.path.parent}: {e.strerror or e}") from None
        elif self.path.is_dir():
            raise BadInput(f"store path is a directory, not a SQLite file: {self.path}")
        try:
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise BadInput(f"cannot open store {self.path}: {e}") from None
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._check_or_init(create)
            if create:
                self._check_writable()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise BadInput(self._unreadable(e)) from None
        except BsprofError:
            self._conn.close()
            raise

    def _unreadable(self, e: sqlite3.DatabaseError) -> str:
        """Why the file cannot be used: not an SQLite file at all, a damaged one, or not writable."""
        if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
            return (
                f"store {self.path} stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s (SQLite said: {e}); "
                "run again when the other bsprof command is done"
            )
        if isinstance(e, sqlite3.OperationalError) and _is_write_failure(e):
            return f"store {self.path} cannot be written (SQLite said: {e}); check its permissions and free space"
        try:
            with self.path.open("rb") as f:
                header = f.read(16)
        except OSError:
            header = b""
        if header == b"SQLite format 3\x00":
            return (
                f"store {self.path} is damaged (SQLite said: {e}); restore it from a copy, or salvage it with "
                f"`sqlite3 {self.path} .recover`"
            )
        return f"{self.path} is not a bsprof store: not an SQLite file (SQLite said: {e})"

    def _check_writable(self) -> None:
        """Refuse a store this process cannot write, before any trial runs (a write rolled back)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('write_probe', '1')")
        finally:
            self._conn.execute("ROLLBACK")

    def _check_or_init(self, create: bool) -> None:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else None
            if version != SCHEMA_VERSION:
                raise BadInput(
                    f"{self.path} has store schema version {version}, this bsprof reads version {SCHEMA_VERSION}"
                )
            return
        if tables or not create:
            raise BadInput(f"{self.path} is an SQLite file but not a bsprof store (no meta table)")
        self._enable_wal()
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    def _enable_wal(self) -> None:
        """Switch a new store to WAL, retrying while another process switches it at the same moment.

        SQLite answers a concurrent ``PRAGMA journal_mode = WAL`` with SQLITE_BUSY at once, without calling the busy
        handler (two sweeps started together on a new store hit this), so the wait is done here.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def transaction(self) -> _Transaction:
        """A ``BEGIN IMMEDIATE`` ... ``COMMIT`` block (rolled back on error)."""
        return _Transaction(self._conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # runs ---------------------------------------------------------------------------------------------
    def open_run(
        self, workload: str, config: dict[str, Any], environment: dict[str, Any], *, fresh: bool = False
    ) -> RunRecord:
        """The run to write into: the latest with this identity's hash, or a new one (always new if ``fresh``).

        A run's identity is ``config`` plus ``environment["identity"]`` (device model, torch / CUDA / cuDNN /
        driver versions and numerics flags, :func:`bsprof.environment.run_identity`) when the environment has
        one: the same store used on another GPU or torch starts a new run, and never mixes trials or an OOM
        floor with the old one.
        """
        identity = environment.get("identity")
        digest = config_hash(config if identity is None else {"config": config, "environment_identity": identity})
        with self.transaction():
            existing = self._conn.execute(
                "SELECT run_id FROM runs WHERE config_hash=? ORDER BY created_at DESC LIMIT 1", (digest,)
            ).fetchone()
            if existing and not fresh:
                return self.run(existing[0])
            count = self._conn.execute("SELECT COUNT(*) FROM runs WHERE config_hash=?", (digest,)).fetchone()[0]
            run_id = digest[:12] if count == 0 else f"{digest[:12]}-{count + 1}"
            self._conn.execute(
                "INSERT INTO runs(run_id, created_at, workload, config_hash, config_json, environment_json)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, time.time(), workload, digest, _json(config), _json(environment)),
            )
        return self.run(run_id)

    def run(self, run_id: str) -> RunRecord:
        row = self._conn.execute(
            "SELECT run_id, created_at, workload, config_hash, config_json, environment_json FROM runs WHERE run_id=?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise BadInput(f"no run {run_id!r} in {self.path}")
        return RunRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]))

    def runs(self) -> list[RunRecord]:
        """All runs, oldest first."""
        ids = [r[0] for r in self._conn.execute("SELECT run_id FROM runs ORDER BY created_at, run_id")]
        return [self.run(i) for i in ids]

    def other_runs(self, run_ids: Iterable[str]) -> list[RunRecord]:
        """The runs not in ``run_ids`` of the workloads those runs measured, oldest first (what a view of
        ``run_ids`` hides)."""
        shown = set(run_ids)
        workloads = {self.run(r).workload for r in shown}
        return [r for r in self.runs() if r.workload in workloads and r.run_id not in shown]

    def trial_counts(self) -> dict[str, int]:
        """Trials stored per run id (runs without trials are absent)."""
        return dict(self._conn.execute("SELECT run_id, COUNT(*) FROM trials GROUP BY run_id").fetchall())

    def latest_run_ids(self) -> list[str]:
        """The most recent run of each workload."""
        rows = self._conn.execute(
            "SELECT run_id FROM runs r WHERE created_at ="
            " (SELECT MAX(created_at) FROM runs WHERE workload = r.workload) ORDER BY workload"
        )
        return [r[0] for r in rows]

    # trials -------------------------------------------------------------------------------------------
    def finished_keys(self, run_id: str) -> set[tuple[str, int, int, float, int]]:
        """Keys (:meth:`TrialSpec.key`) of the run's trials that need not run again."""
        rows = self._conn.execute(
            f"SELECT kind, batch_size, seed, lr, repeat FROM trials WHERE run_id=? AND status IN "
            f"({','.join('?' * len(FINISHED))})",
            (run_id, *FINISHED),
        )
        return {(k, b, s, round(lr, 12), r) for k, b, s, lr, r in rows}

    def add_trial(self, run_id: str, result: TrialResult) -> bool:
        """Write one finished trial (and its curve) in one transaction.

        An ``error`` row for the same key is replaced; any other existing row is kept (a concurrent or
        earlier sweep already measured it) and ``False`` is returned.
        """
        s: TrialSpec = result.spec
        st = result.step_times
        step_json = (
            _json(
                {
                    "block_times_s": st.block_times_s,
                    "steps_per_block": st.steps_per_block,
                    "warmup_steps": st.warmup_steps,
                }
            )
            if st is not None
            else None
        )
        with self.transaction():
            self._conn.execute(
                "DELETE FROM trials WHERE run_id=? AND kind=? AND batch_size=? AND seed=? AND lr=? AND repeat=?"
                " AND status='error'",
                (run_id, s.kind, s.batch_size, s.seed, s.lr, s.repeat),
            )
            cur = self._conn.execute(
                "INSERT INTO trials(run_id, workload, kind, batch_size, seed, lr, repeat, phase, status, device,"
                " device_name, error, started_at, duration_s, metrics_json, reasons_json, step_times_json,"
                " extra_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(run_id, kind, batch_size, seed, lr, repeat) DO NOTHING",
                (
                    run_id,
                    s.workload,
                    s.kind,
                    s.batch_size,
                    s.seed,
                    s.lr,
                    s.repeat,
                    s.phase,
                    result.status,
                    result.device,
                    result.device_name,
                    result.error,
                    result.started_at,
                    result.duration_s,
                    _json(result.metrics),
                    _json(result.reasons),
                    step_json,
                    _json(result.extra.to_json()),
                ),
            )
            if cur.rowcount == 0:
                return False
            trial_id = cur.lastrowid
            self._conn.executemany(
                "INSERT INTO curves(trial_id, idx, row_json) VALUES (?, ?, ?)",
                [(trial_id, i, _json(row)) for i, row in enumerate(result.curve)],
            )
        return True

    def trial_rows(self, run_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Every trial (of the given runs, or all) as a flat dict, metrics unpacked; oldest first."""
        sql = (
            "SELECT id, run_id, workload, kind, batch_size, seed, lr, repeat, phase, status, device, device_name,"
            " error, started_at, duration_s, metrics_json, reasons_json, step_times_json, extra_json FROM trials"
        )
        params: tuple[Any, ...] = ()
        if run_ids is not None:
            ids = list(run_ids)
            sql += f" WHERE run_id IN ({','.join('?' * len(ids))})"
            params = tuple(ids)
        out = []
        for r in self._conn.execute(sql + " ORDER BY id", params):
            row: dict[str, Any] = {
                "trial_id": r[0],
                "run_id": r[1],
                "workload": r[2],
                "kind": r[3],
                "batch_size": r[4],
                "seed": r[5],
                "lr": r[6],
                "repeat": r[7],
                "phase": r[8],
                "status": r[9],
                "device": r[10],
                "device_name": r[11],
                "error": r[12],
                "started_at": r[13],
                "duration_s": r[14],
            }
            row.update(json.loads(r[15]))
            row["reasons"] = json.loads(r[16])
            row["step_times"] = json.loads(r[17]) if r[17] else None
            row["extra"] = json.loads(r[18])
            out.append(row)
        return out

    def curve(self, trial_id: int) -> list[dict[str, Any]]:
        """The learning curve of one trial, in order."""
        rows = self._conn.execute("SELECT row_json FROM curves WHERE trial_id=? ORDER BY idx", (trial_id,))
        return [json.loads(r[0]) for r in rows]

    # find-max-batch ------------------------------------------------------------------------------------
    def add_max_batch(
        self,
        workload: str,
        device: str,
        config: dict[str, Any],
        environment: dict[str, Any],
        max_batch_size: int | None,
        first_oom_batch_size: int | None,
        tried: list[tuple[int, str]],
    ) -> None:
        """Record a ``find-max-batch`` result (``tried``: (batch size, status) in the order tried)."""
        with self.transaction():
            self._conn.execute(
                "INSERT INTO max_batch(created_at, workload, device, config_json, environment_json,"
                " max_batch_size, first_oom_batch_size, tried_json) VALUES (?,?,?,?,?,?,?,?)",
                (
                    time.time(),
                    workload,
                    device,
                    _json(config),
                    _json(environment),
                    max_batch_size,
                    first_oom_batch_size,
                    _json(tried),
                ),
            )

    def max_batch_results(self) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT created_at, workload, device, max_batch_size, first_oom_batch_size, tried_json FROM max_batch"
            " ORDER BY id"
        )
        return [
            {
                "created_at": r[0],
                "workload": r[1],
                "device": r[2],
                "max_batch_size": r[3],
                "first_oom_batch_size": r[4],
                "tried": json.loads(r[5]),
            }
            for r in rows
        ]

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` answer (``"ok"`` when sound)."""
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, exc: object, *rest: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
                return
            except sqlite3.OperationalError as e:
                exc = e
        if self._conn.in_transaction:  # a COMMIT that failed may have ended the transaction already
            self._conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and _is_write_failure(exc):
            raise WriteFailed(
                f"cannot write to the store: {exc} (what was stored before is kept; free space or fix the "
                "permissions, then run the same command again)"
            ) from None
        if isinstance(exc, sqlite3.OperationalError) and exc_type is None:
            raise exc


def _is_busy(e: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock this one needs (SQLITE_BUSY / SQLITE_LOCKED)."""
    return getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(e)


def _is_write_failure(e: sqlite3.OperationalError) -> bool:
    """A write refused by the file system (full disk, read-only file or folder, I/O error)."""
    text = str(e).lower()
    return any(s in text for s in ("full", "readonly", "read-only", "disk i/o", "unable to open"))
