"""Run a grid of experiments in worker processes into a resumable SQLite results store.

``run_sweep(config_path, sweep_dir)`` expands the sweep config (every list-valued field is an
axis, times ``seeds``; see :func:`vanishing.experiments.config.expand_sweep`), validates every
run before starting any, and trains the runs that are not finished yet, each into
``<sweep_dir>/runs/<name>/`` (named by the swept values). The parent process is the store's only writer: a row goes
``pending`` -> ``running`` (when handed to a worker) -> ``completed`` | ``diverged`` |
``failed``. A sweep killed at any point and started again resets its ``running`` rows to
``pending``, takes the result of a pending run whose directory holds a finished run (its
``summary.json``, written last) and redoes the others from an empty directory; the key (a hash of the resolved config) is the primary key, so no run is ever listed twice.

``backend="ray"`` trains the same runs as Ray Tune trials instead of local worker processes
(:func:`_execute_ray`): the planning, the store and its rows, the run directories and the
single-run function are the same; only who runs ``run_experiment`` changes.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vanishing.experiments.config import ConfigError, ExperimentConfig, expand_sweep, read_toml
from vanishing.experiments.store import DB, _decode, read_sweep

__all__ = [
    "SweepStore",
    "SweepRun",
    "SweepBusyError",
    "MissingBackendError",
    "BACKENDS",
    "plan_sweep",
    "run_sweep",
    "read_sweep",
    "FINISHED",
]

COPY = "sweep.toml"
RUNS = "runs"
FINISHED = ("completed", "diverged", "failed")
BACKENDS = ("local", "ray")
RAY_DIR = "ray"  # Ray Tune's own experiment state, under the sweep directory

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  key TEXT PRIMARY KEY,
  params TEXT NOT NULL,
  seed INTEGER NOT NULL,
  config TEXT NOT NULL,
  status TEXT NOT NULL,
  summary TEXT,
  kinds TEXT,
  run_dir TEXT NOT NULL,
  started_at REAL, finished_at REAL, error TEXT
)
"""


@dataclass
class SweepRun:
    """One run of a sweep: its key, the swept values (``params``), the resolved config and its
    run directory relative to the sweep directory (``runs/depth=20-activation=sigmoid-seed=0``;
    a sweep started before readable names keeps its ``runs/<key>`` directories)."""

    key: str
    params: dict[str, Any]
    config: ExperimentConfig
    run_dir: str = ""

    def __post_init__(self) -> None:
        if not self.run_dir:
            self.run_dir = f"{RUNS}/{self.key}"


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_MAX_NAME = 96  # well under every file system's 255-byte name limit, and readable in a listing


def _short_names(params: list[dict[str, Any]]) -> dict[str, str]:
    """Each swept field's shortest unambiguous name: the last dotted part (``model.depth`` ->
    ``depth``) unless two swept fields share it, then the full name."""
    fields = list(dict.fromkeys(k for p in params for k in p))
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (t if last.count(t) == 1 else f) for f, t in zip(fields, last)}


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return _UNSAFE.sub("_", text).strip("._") or "_"


def run_names(params: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """Readable, unique directory names for runs: ``depth=20-activation=sigmoid-seed=0``.

    Characters a file name should not hold become ``_``; a name that is too long, or that two
    runs would share after that, gets the first 8 characters of the run's key appended.

    Example:
        >>> from vanishing.experiments.sweep import run_names
        >>> run_names([{"model.depth": 2, "seed": 0}, {"model.depth": 4, "seed": 0}], ["ab", "cd"])
        ['depth=2-seed=0', 'depth=4-seed=0']
        >>> run_names([{"data.path": "a/b"}, {"data.path": "a_b"}], ["1234567890", "abcdefghij"])
        ['path=a_b-12345678', 'path=a_b-abcdefgh']
    """
    short = _short_names(params)
    names = [
        "-".join(f"{short[k]}={_value_text(v)}" for k, v in p.items()) or "run" for p in params
    ]
    counts = {n: names.count(n) for n in names}
    return [
        n if counts[n] == 1 and len(n) <= _MAX_NAME else f"{n[:_MAX_NAME]}-{key[:8]}"
        for n, key in zip(names, keys)
    ]


def plan_sweep(raw: dict[str, Any]) -> list[SweepRun]:
    """The runs of a sweep config's raw dict, in grid order, all validated.

    Example:
        >>> from vanishing.experiments.sweep import plan_sweep
        >>> runs = plan_sweep({"model": {"depth": [2, 4]}, "seeds": [0, 1, 2]})
        >>> len(runs), runs[0].params, runs[0].run_dir
        (6, {'model.depth': 2, 'seed': 0}, 'runs/depth=2-seed=0')
    """
    expanded = expand_sweep(raw)
    names = run_names([p for p, _ in expanded], [c.key for _, c in expanded])
    return [
        SweepRun(config.key, params, config, f"{RUNS}/{name}")
        for (params, config), name in zip(expanded, names)
    ]


class SweepStore:
    """The sweep's SQLite results store (WAL mode), one row per run; see ``docs/config.md``.

    Only one process writes it (the sweep's parent); readers may open it at any time.

    Example:
        >>> import tempfile
        >>> from vanishing.experiments.sweep import SweepStore, plan_sweep
        >>> store = SweepStore(tempfile.mkdtemp() + "/sweep.sqlite")
        >>> runs = plan_sweep({"model": {"depth": [2, 4]}})
        >>> store.add(runs); store.add(runs)          # adding twice inserts nothing new
        >>> store.mark_running(runs[0].key)
        >>> store.reset_interrupted()                 # what a restart does: running -> pending
        1
        >>> sorted(store.statuses().values())
        ['pending', 'pending']
        >>> store.close()
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a committed row survives a kill
        self.conn.execute(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def add(self, runs: Iterable[SweepRun]) -> None:
        """Insert the runs not in the store yet as ``pending``; existing rows are untouched."""
        rows = [
            (
                r.key,
                json.dumps(r.params),
                r.config.seed,
                json.dumps(r.config.to_dict(), sort_keys=True),
                "pending",
                r.run_dir,
            )
            for r in runs
        ]
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT OR IGNORE INTO runs (key, params, seed, config, status, run_dir) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def reset_interrupted(self) -> int:
        """Set rows left ``running`` by a killed sweep back to ``pending``; returns how many."""
        cur = self.conn.execute(
            "UPDATE runs SET status = 'pending', started_at = NULL WHERE status = 'running'"
        )
        return cur.rowcount

    def retry(self, keys: Iterable[str], statuses: tuple[str, ...] = ("failed",)) -> int:
        """Set these keys' rows with one of ``statuses`` back to ``pending``."""
        keys = list(keys)
        marks = ",".join("?" * len(statuses))
        n = 0
        with self.conn:
            self.conn.execute("BEGIN")
            for key in keys:
                cur = self.conn.execute(
                    f"UPDATE runs SET status = 'pending', summary = NULL, kinds = NULL, "
                    f"started_at = NULL, finished_at = NULL, error = NULL "
                    f"WHERE key = ? AND status IN ({marks})",
                    (key, *statuses),
                )
                n += cur.rowcount
        return n

    def statuses(self) -> dict[str, str]:
        """``{key: status}`` of every row."""
        return dict(self.conn.execute("SELECT key, status FROM runs"))

    def mark_running(self, key: str) -> None:
        """The run was handed to a worker."""
        self.conn.execute(
            "UPDATE runs SET status = 'running', started_at = ? WHERE key = ?", (time.time(), key)
        )

    def finish(self, key: str, summary: dict[str, Any]) -> None:
        """Record a finished run's summary (status, metrics, kinds, error)."""
        self.conn.execute(
            "UPDATE runs SET status = ?, summary = ?, kinds = ?, finished_at = ?, error = ? "
            "WHERE key = ?",
            (
                summary["status"],
                json.dumps(summary),
                json.dumps(summary.get("kinds", [])),
                time.time(),
                summary.get("error"),
                key,
            ),
        )

    def rows(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts with the JSON columns decoded, in ``keys`` order (default: all)."""
        self.conn.row_factory = sqlite3.Row
        try:
            found = {r["key"]: _decode(r) for r in self.conn.execute("SELECT * FROM runs")}
        finally:
            self.conn.row_factory = None
        if keys is None:
            return list(found.values())
        return [found[k] for k in keys if k in found]


# ----------------------------------------------------------------------------- workers
def _init_worker(sweep_pid: int) -> None:
    import threading

    def watch_parent() -> None:  # a sweep killed outright (SIGKILL) leaves no orphans behind
        while True:
            time.sleep(1.0)
            try:
                os.kill(sweep_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except OSError:
                pass  # alive, owned by someone else: keep going

    threading.Thread(target=watch_parent, name="vanishing-sweep-parent", daemon=True).start()
    _one_thread()


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: N workers use N cores, not N x N threads
    with contextlib.suppress(RuntimeError):  # already set in the forkserver's torch
        torch.set_num_interop_threads(1)


def _run_one(config: dict[str, Any], run_dir: str, report: bool = False) -> dict[str, Any]:
    from vanishing.experiments.runner import run_experiment

    summary = run_experiment(ExperimentConfig.model_validate(config), run_dir)
    if report and summary.get("steps"):
        # the run's own report.html, drawn here in the worker (in parallel with the other
        # runs) rather than one after another when the sweep's page is written
        try:
            from vanishing.report.html import render_run, write_page

            write_page(Path(run_dir) / "report.html", render_run(run_dir))
        except Exception:  # noqa: BLE001 - the run's records stand; the sweep page retries
            pass
    return summary


# imported once by the forkserver, so that each worker starts with them (a missing one is skipped)
_PRELOAD = (
    "torch",
    "torch._dynamo",  # torch.optim imports it on first use: seconds, once per worker otherwise
    "pandas",
    "pyarrow.parquet",
    "vanishing.monitor",
    "vanishing.diagnose",
    "vanishing.experiments.runner",
    "vanishing.experiments.tasks",
    "vanishing.experiments.models",
)


def _context() -> multiprocessing.context.BaseContext:
    # never plain fork: the parent may hold torch's thread pools and locks
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # workers fork from a server that has imported torch once, instead of importing it each
        ctx.set_forkserver_preload(list(_PRELOAD))
        return ctx
    return multiprocessing.get_context("spawn")


def _failed(error: str) -> dict[str, Any]:
    return {
        "status": "failed",
        "steps": 0,
        "train_loss": None,
        "test_loss": None,
        "test_metric": None,
        "metric_name": "",
        "first_last_ratio": None,
        "kinds": [],
        "seconds": 0.0,
        "error": error,
    }


def _terminate(pool: Any) -> None:
    # shut down first, so that the pool does not ask the forkserver for replacement workers
    # while the current ones are being terminated (that request fails, noisily, on exit)
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()


# ----------------------------------------------------------------------------- driver
OnEvent = Callable[[str, "SweepRun | None", "dict[str, Any] | None"], None]


def _changed_fixed_field(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The first field that is a single value in both configs and differs ("" if none).

    Swept fields (lists, ``seeds``) may grow: a sweep extended with more values or seeds
    resumes in the same store. A fixed field that changed makes a different experiment.
    """
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) or isinstance(b, dict):
            found = _changed_fixed_field(a or {}, b or {}, name + ".")
            if found:
                return found
        elif (
            key not in ("name", "seeds")
            and not isinstance(a, list)
            and not isinstance(b, list)
            and a != b
        ):
            return f"{name} was {a!r}, now {b!r}"
    return ""


def run_sweep(
    config_path: str | os.PathLike,
    sweep_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    retry_failed: bool = False,
    on_event: OnEvent | None = None,
    backend: str = "local",
    reports: bool = False,
) -> tuple[list[SweepRun], list[dict[str, Any]]]:
    """Run every unfinished run of the sweep config into ``sweep_dir``; resumable.

    ``workers`` processes (default: one per core) train one run each at a time. With
    ``backend="ray"`` the runs are Ray Tune trials instead (1 CPU each, at most ``workers`` at
    a time; see ``docs/ray.md``), recorded in the same store the same way. ``on_event``
    is called in the parent with ``("plan", None, {"total": n, "todo": m})`` once, then
    ``("start", run, None)`` and ``("finish", run, summary)`` for each run it trains.
    ``retry_failed`` also redoes runs that failed before. ``reports``: each local worker also
    writes its run's report.html when the run ends (the sweep's page, ``write_report``, writes
    any still missing). Returns the runs of this config (in grid order) and their store rows.

    Example:
        >>> import pathlib, tempfile
        >>> from vanishing.experiments.sweep import run_sweep
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "s.toml").write_text('seeds = [0, 1]\\n[model]\\ndepth = 2\\n[train]\\nsteps = 5\\n')
        >>> runs, rows = run_sweep(d / "s.toml", d / "out", workers=1)   # doctest: +SKIP
        >>> [r["status"] for r in rows]                                    # doctest: +SKIP
        ['completed', 'completed']
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "ray":
        _import_ray()  # before anything is written: a missing ray is a clear error
    config_path = Path(config_path)
    raw = read_toml(config_path)
    plan = plan_sweep(raw)  # every run validated before anything starts
    if any(r.config.train.device == "cuda" for r in plan):
        from vanishing.experiments.runner import resolve_device

        resolve_device("cuda")
    requested_workers = workers
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    sweep_dir = Path(sweep_dir)
    (sweep_dir / RUNS).mkdir(parents=True, exist_ok=True)
    from vanishing.recorder.writer import atomic_write_bytes

    lock = _lock(sweep_dir)
    if (sweep_dir / COPY).is_file():
        problem = _changed_fixed_field(read_toml(sweep_dir / COPY), raw)
        if problem:
            lock.close()
            raise ConfigError(
                f"{sweep_dir} holds a sweep whose {problem}; its results would mix with this "
                "one's: pass another --out (more seeds or more values of a swept field are fine)"
            )
    atomic_write_bytes(sweep_dir / COPY, config_path.read_bytes())
    store = SweepStore(sweep_dir / DB)
    try:
        store.add(plan)
        # the store is the record of where each run lives: a run planned by an older version
        # (or under other names) keeps its directory
        stored = dict(store.conn.execute("SELECT key, run_dir FROM runs"))
        for r in plan:
            r.run_dir = stored.get(r.key, r.run_dir)
        interrupted = {key for key, st in store.statuses().items() if st == "running"}
        store.reset_interrupted()
        if retry_failed:
            store.retry(r.key for r in plan)
        status = store.statuses()
        todo: deque[SweepRun] = deque()
        for r in plan:
            if status[r.key] != "pending":
                continue
            summary = None
            if r.key in interrupted:  # it may have finished before its row was written
                summary = _finished_summary(sweep_dir / r.run_dir, r.config)
            if summary is not None:
                store.finish(r.key, summary)
                continue
            # no summary.json (written last): a half-written run directory; start over
            shutil.rmtree(sweep_dir / r.run_dir, ignore_errors=True)
            todo.append(r)
        if on_event:
            parallel = (requested_workers or 1) if backend == "ray" else min(workers, len(todo))
            on_event(
                "plan", None, {"total": len(plan), "todo": len(todo), "workers": max(1, parallel)}
            )
        if todo and backend == "ray":
            _execute_ray(store, sweep_dir, todo, requested_workers, on_event)
        elif todo:
            _execute(store, sweep_dir, todo, min(workers, len(todo)), on_event, reports)
        return plan, store.rows(r.key for r in plan)
    finally:
        store.close()
        lock.close()


class SweepBusyError(RuntimeError):
    """Another process is running a sweep in the same directory."""


class MissingBackendError(ImportError):
    """The sweep backend asked for is not installed."""


def _lock(sweep_dir: Path):
    """An exclusive lock on the sweep directory for as long as the returned file is open; the OS
    releases it when the process dies, so a killed sweep never leaves it behind."""
    handle = open(sweep_dir / ".lock", "a+")  # noqa: SIM115 - held open on purpose
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SweepBusyError(
            f"{sweep_dir}: another vanishing sweep is running in this directory; "
            "wait for it or pass another --out"
        ) from None
    return handle


def _finished_summary(run_dir: Path, config: ExperimentConfig) -> dict[str, Any] | None:
    """The summary of a run directory that holds a finished run of ``config``, else None."""
    from vanishing.experiments.runner import CONFIG, SUMMARY

    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        same = json.loads((run_dir / CONFIG).read_text()) == config.to_dict()
    except (OSError, ValueError):
        return None
    if not same or not isinstance(summary, dict) or summary.get("status") not in FINISHED:
        return None
    return summary


def _execute(
    store: SweepStore,
    sweep_dir: Path,
    todo: deque[SweepRun],
    workers: int,
    on_event: OnEvent | None,
    reports: bool = False,
) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers, mp_context=_context(), initializer=_init_worker, initargs=(os.getpid(),)
        )

    pool = new_pool()
    inflight: dict[Any, SweepRun] = {}
    try:
        while todo or inflight:
            while todo and len(inflight) < workers:
                run = todo.popleft()
                store.mark_running(run.key)
                future = pool.submit(
                    _run_one, run.config.to_dict(), str(sweep_dir / run.run_dir), reports
                )
                inflight[future] = run
                if on_event:
                    on_event("start", run, None)
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                run = inflight.pop(future)
                try:
                    summary = future.result()
                except BrokenProcessPool:
                    broken = True
                    summary = _failed(
                        "the worker process died while this run was in flight (this run or "
                        "one beside it crashed it); rerun with --retry-failed"
                    )
                except Exception as e:  # noqa: BLE001 - recorded in the store
                    summary = _failed(f"{type(e).__name__}: {e}".splitlines()[0])
                store.finish(run.key, summary)
                if on_event:
                    on_event("finish", run, summary)
            if broken:
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    except BaseException:
        _terminate(pool)  # interrupted: rows left 'running' are redone by the next start
        raise
    pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- Ray backend
_RAY_MISSING = '--backend ray needs ray: pip install "vanishing[ray]"'

# the live side of the Ray sweep that this process drives now: (store, the runs to do by key,
# on_event). Tune pickles its callbacks into its experiment state (restored by a later start,
# maybe from a moved directory) and, with Ray Client, runs them on the head node; so the
# callback carries only a path and keys, for when it runs where no sweep is live.
_RayLive = tuple[SweepStore, dict[str, SweepRun], "OnEvent | None"]
_RAY_LIVE: list[_RayLive] = []


def _ray_live() -> _RayLive | None:
    # a module-level function, so that the callback, pickled by value, refers to it by name
    return _RAY_LIVE[-1] if _RAY_LIVE else None


def _import_ray() -> Any:
    """``ray`` with ``ray.tune``, or :class:`MissingBackendError` with the one-line fix."""
    try:
        import ray
        import ray.tune  # noqa: F401 - Tune is what the backend uses
    except ImportError:
        raise MissingBackendError(_RAY_MISSING) from None
    return ray


def _ray_trial(trial: dict[str, Any], *, runs: dict[str, tuple[dict[str, Any], str]]) -> None:
    """One Tune trial: train one run of the sweep with the local pool's single-run function.

    ``trial["key"]`` picks the run; ``runs`` (``key -> (config, absolute run dir)``) holds the
    runs this start of the sweep has to do. A trial of a restored experiment whose run is not
    among them (finished since, or dropped from the config) reports no summary and trains
    nothing; a run whose directory already holds its finished run is taken, not trained again.
    """
    from ray import tune

    key = trial["key"]
    if key not in runs:
        tune.report({"key": key, "summary": ""})
        return
    config, run_dir = runs[key]
    summary = _finished_summary(Path(run_dir), ExperimentConfig.model_validate(config))
    if summary is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a half-written try of this trial
        _one_thread()
        try:
            summary = _run_one(config, run_dir)
        except Exception as e:  # noqa: BLE001 - recorded in the store, as the local pool does
            summary = _failed(f"{type(e).__name__}: {e}".splitlines()[0])
    tune.report({"key": key, "summary": json.dumps(summary)})


def _trial_dirname(trial: Any) -> str:
    return str(trial.config["key"])


def _ray_callback(sweep_dir: str, keys: frozenset[str]) -> Any:
    """A Tune callback that records trial starts and results in the sweep's store, through the
    same :class:`SweepStore` calls as the local pool, in the process that drives Tune (the only
    writer). Writes follow the row's status (pending -> running -> finished), so a callback
    restored from an older start of the sweep never rewrites a finished row."""
    from ray import tune

    class SweepStoreCallback(tune.Callback):
        def __init__(self) -> None:
            self.sweep_dir, self.keys = sweep_dir, keys
            self._own: SweepStore | None = None

        def __getstate__(self) -> dict[str, Any]:
            return {"sweep_dir": self.sweep_dir, "keys": self.keys}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state, _own=None)

        def _live(self) -> tuple[SweepStore, set[str] | dict[str, SweepRun], OnEvent | None]:
            live = _ray_live()
            if live is not None:
                return live
            if self._own is None:  # driven elsewhere (Ray Client: on the head node)
                self._own = SweepStore(Path(self.sweep_dir) / DB)
            return self._own, set(self.keys), None

        def _record(self, key: str, summary: dict[str, Any]) -> None:
            store, todo, on_event = self._live()
            if key not in todo or store.statuses().get(key) not in ("pending", "running"):
                return
            store.finish(key, summary)
            if on_event and isinstance(todo, dict):
                on_event("finish", todo[key], summary)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            store, todo, on_event = self._live()
            key = trial.config["key"]
            if key not in todo or store.statuses().get(key) != "pending":
                return
            store.mark_running(key)
            if on_event and isinstance(todo, dict):
                on_event("start", todo[key], None)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if result.get("summary"):
                self._record(result["key"], json.loads(result["summary"]))

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._record(trial.config["key"], _failed(_trial_error(trial)))

        def on_experiment_end(self, trials, **info) -> None:
            if self._own is not None:
                self._own.close()
                self._own = None

    return SweepStoreCallback()


def _trial_error(trial: Any) -> str:
    """One line for a Tune trial that raised (its worker died, or Ray failed it)."""
    last = ""
    with contextlib.suppress(Exception):
        lines = [ln.strip() for ln in Path(trial.error_file).read_text().splitlines()]
        last = next((ln for ln in reversed(lines) if ln), "")
    return f"the Ray trial failed: {last}" if last else "the Ray trial failed"


def _execute_ray(
    store: SweepStore,
    sweep_dir: Path,
    todo: deque[SweepRun],
    workers: int | None,
    on_event: OnEvent | None,
) -> None:
    """Train ``todo`` as Ray Tune trials, one per run, 1 CPU each, at most ``workers`` at once.

    Ray connects to ``RAY_ADDRESS`` when it is set, else starts a local Ray of ``workers`` CPUs
    (one per core by default) for this sweep, unless this process already called ``ray.init``.
    Tune's own state lives in ``<sweep_dir>/ray``: when a killed sweep left it there, that
    experiment is resumed first with ``Tuner.restore(..., resume_errored=True)``; the runs it
    did not cover (new grid points, rows reset since) then run as a fresh experiment there.
    """
    ray = _import_ray()
    from ray import tune

    sweep_dir = sweep_dir.absolute()  # trials run in other processes, maybe other machines
    started_ray = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        quiet: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": "error",
        }
        if address:
            ray.init(address=address, **quiet)
        else:  # "local": never a stray `ray start` cluster of this machine (RAY_ADDRESS=auto is)
            ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, **quiet)
        started_ray = True

    where = str(sweep_dir)
    by_key = {r.key: r for r in todo}
    experiment = sweep_dir / RAY_DIR
    # Ctrl-C raises here, as with the local pool: the state Tune saved and the store resume it;
    # and the sweep's own progress is the only output (Tune's tables are off)
    tune_env = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0"}
    saved_env = {name: os.environ.get(name) for name in tune_env}
    os.environ.update(tune_env)
    _RAY_LIVE.append((store, by_key, on_event))
    try:
        for attempt in ("restore", "fresh"):
            status = store.statuses()
            left = [r for r in todo if status.get(r.key) in ("pending", "running")]
            if not left:
                break
            runs = {r.key: (r.config.to_dict(), str(sweep_dir / r.run_dir)) for r in left}
            trainable = tune.with_resources(tune.with_parameters(_ray_trial, runs=runs), {"cpu": 1})
            if attempt == "restore":
                # killed before Tune saved any trial: only tuner.pkl, nothing to resume
                saved = any(experiment.glob("experiment_state-*.json"))
                if not saved or not tune.Tuner.can_restore(str(experiment)):
                    continue
                try:
                    tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
                except (ValueError, TypeError, OSError, EOFError):  # another version's state
                    continue
            else:
                shutil.rmtree(experiment, ignore_errors=True)  # done with, or unreadable
                tuner = tune.Tuner(
                    trainable,
                    param_space={"key": tune.grid_search([r.key for r in left])},
                    tune_config=tune.TuneConfig(
                        max_concurrent_trials=workers or None,
                        trial_name_creator=_trial_dirname,
                        trial_dirname_creator=_trial_dirname,
                    ),
                    run_config=tune.RunConfig(
                        name=RAY_DIR,
                        storage_path=str(sweep_dir),
                        verbose=0,
                        callbacks=[_ray_callback(where, frozenset(runs))],
                    ),
                )
            tuner.fit()
        status = store.statuses()
        for r in todo:  # a trial Tune ended without a result: never left looking unfinished
            if status.get(r.key) in ("pending", "running"):
                summary = _failed("the Ray trial ended without reporting a result")
                store.finish(r.key, summary)
                if on_event:
                    on_event("finish", r, summary)
    finally:
        _RAY_LIVE.pop()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if started_ray:
            ray.shutdown()
