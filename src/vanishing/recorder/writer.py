"""Append flushed blocks to a run directory as Parquet part files, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vanishing.recorder.schema import MANIFEST, PART_FORMAT, TABLES


def atomic_write_bytes(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never a torn file).

    The temporary file is created exclusively under an unpredictable name (``mkstemp``), so
    nothing planted in the directory is followed or overwritten. ``exclusive``: fail with
    ``FileExistsError`` when ``path`` exists, atomically (a hard link, not a rename, puts the
    file in place), so that of two writers racing for a new file exactly one wins.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    _umask_mode(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: exclusive create, then write
                with os.fdopen(
                    os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb"
                ) as f:
                    f.write(data)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_HOLDS_RUN = (
    "{} already holds a run (manifest.json exists); pass a new run_dir, overwrite=True to "
    "replace it, or resume=True to continue it"
)


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary files of a writer that was killed mid-write (``.part-*.tmp``, ``.manifest*``):
    never read, removed when the run is next opened for writing."""
    for folder in (run_dir, *(run_dir / t for t in TABLES)):
        for leftover in folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)


#: what a run directory holds besides the tables: removed by ``overwrite``, nothing else is
RUN_FILES = (MANIFEST, "config.json", "eval.parquet", "summary.json", "report.html")


class RunWriter:
    """Owns a run directory: writes the manifest and numbered part files for each table.

    ``mode``: ``"new"`` (the directory must not hold a run), ``"overwrite"`` (a run there is
    removed first: its manifest, tables and the files experiments write beside them, nothing
    else) or ``"resume"`` (a run there is continued: new parts are numbered after its last
    complete flush, whose torn tail, if any, they replace).
    """

    def __init__(self, run_dir: str | os.PathLike, mode: str = "new") -> None:
        self.run_dir = Path(run_dir)
        holds_run = (self.run_dir / MANIFEST).exists()
        self.next_part = 0
        self._claim = mode == "new"  # the first manifest is written exclusively: the claim
        if mode == "new" and holds_run:
            raise FileExistsError(_HOLDS_RUN.format(self.run_dir))
        if mode == "resume":
            if not holds_run:
                raise FileNotFoundError(f"{self.run_dir}: no run to resume (no manifest.json)")
            steps = [int(p.name[5:10]) for p in (self.run_dir / "steps").glob("part-*.parquet")]
            self.next_part = max(steps, default=-1) + 1
        if mode == "overwrite" and holds_run:
            for name in RUN_FILES:
                (self.run_dir / name).unlink(missing_ok=True)
            for table in TABLES:
                shutil.rmtree(self.run_dir / table, ignore_errors=True)
        for table in TABLES:
            (self.run_dir / table).mkdir(parents=True, exist_ok=True)
        if mode != "new":
            _remove_leftovers(self.run_dir)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest; the first one of a new run claims the directory: of two monitors
        started on one directory, the second gets ``FileExistsError``."""
        data = json.dumps(manifest, indent=2, sort_keys=False, default=str).encode()
        try:
            atomic_write_bytes(self.run_dir / MANIFEST, data, exclusive=self._claim)
        except FileExistsError:
            raise FileExistsError(_HOLDS_RUN.format(self.run_dir)) from None
        self._claim = False

    def write_block(self, tables: dict[str, Any]) -> None:
        """Write one flush: a part per table (pyarrow.Table), ``steps`` last."""
        import pyarrow.parquet as pq

        name = PART_FORMAT.format(self.next_part)
        for table in TABLES:
            t = tables.get(table)
            if t is None or t.num_rows == 0:
                continue
            path = self.run_dir / table / name
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + name, suffix=".tmp")
            os.close(fd)
            _umask_mode(tmp)
            try:
                pq.write_table(t, tmp, compression="zstd")
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        self.next_part += 1


_umask: int | None = None


def _umask_mode(path: str) -> None:
    """Give a temporary file the mode a plain open() would (mkstemp makes it private: 0600)."""
    global _umask
    if _umask is None:  # read once: os.umask can only be read by setting it
        _umask = os.umask(0o022)
        os.umask(_umask)
    os.chmod(path, 0o666 & ~_umask)
