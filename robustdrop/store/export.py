"""What leaves the machine a run trained on: a run's results without its checkpoints
(:func:`export_run`), and a folder of them packed as one ``.tar.gz`` (:func:`pack_folder`).

A results copy is small (metrics, config, manifest, events: tens of KB) where the run directory
holds checkpoints of tens of MB each; it is what a lent GPU machine sends back. It is not a run
that can be continued: the package's reuse rule needs the checkpoints.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

from robustdrop._files import atomic_write_bytes
from robustdrop.store.run_store import RunStore

EXPORT_FILES = (RunStore.CONFIG, RunStore.MANIFEST, RunStore.METRICS_PARQUET, RunStore.METRICS_CSV, RunStore.EVENTS)


def export_run(run: str | os.PathLike, dest: str | os.PathLike, *, extra: Sequence[str] = ()) -> bool:
    """Copy run directory ``run``'s :data:`EXPORT_FILES` and the ``extra`` files or folders (paths
    inside the run, e.g. a cached evaluation, ``arrays/snapshots``) that exist into ``dest``,
    replacing it whole (written beside it, then renamed). Returns False, copying nothing, when
    ``run`` is not a run directory (no config.json yet)."""
    run, dest = Path(run), Path(dest)
    if not (run / RunStore.CONFIG).is_file():
        return False
    fresh = dest.with_name(f".{dest.name}.tmp")  # a hidden name: pack_folder leaves a half copy out
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    for name in (*EXPORT_FILES, *extra):
        if (run / name).is_file():
            (fresh / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / name, fresh / name)
        elif (run / name).is_dir():
            shutil.copytree(run / name, fresh / name)
    shutil.rmtree(dest, ignore_errors=True)
    fresh.rename(dest)
    return True


def pack_folder(folder: str | os.PathLike, archive: str | os.PathLike, *, arcname: str) -> int:
    """Write ``folder``'s files as the gzipped tar ``archive`` (atomically), under ``arcname/``,
    leaving out hidden files and folders (a name starting with a dot, at any depth). Returns the
    archive's size in bytes."""
    folder, buf = Path(folder), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                tar.add(path, arcname=f"{arcname}/{relative}")
    atomic_write_bytes(archive, buf.getvalue())
    return len(buf.getvalue())
