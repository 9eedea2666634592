"""One cell of a sweep in its own process: ``python -m robustdrop.sweeps SWEEP_DIR CELL``.

Every backend runs a cell the same way: a fresh Python process (never a fork of a process that
has torch loaded) whose environment fixes the CPU thread budget before torch starts its thread
pool (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads that
spin while they wait make neighbouring cells much slower on a shared CPU), with its output
appended to ``logs/<cell>.log``. The process reads the cell's config from ``sweep.json`` and

* for a training cell, reuses, resumes or (re)trains its run directory by the package's one rule
  (:func:`robustdrop.api.ensure`, :func:`robustdrop.reuse.decide`: a finished run with the
  cell's config is reused, a stopped one resumed exactly, anything else trained anew), with
  ``"@cell"`` values resolved to those cells' run directories;
* for an ``evaluate`` cell, evaluates the named run's checkpoint
  (:func:`robustdrop.evaluation.evaluate_checkpoint`) into ``<cell>/evaluation.csv``;
* for a ``replay`` cell, replays diagnostics over the named finished run's per-epoch weights into
  that run's metrics (:func:`robustdrop.diagnostics.replay.replay_run`: reused once finished);

then writes ``logs/<cell>.result.json`` (``{"ok": true}`` or ``{"ok": false, "error": one line}``).
A process killed before that leaves no result file; :func:`finish_cell` reports its signal.

SIGTERM (or SIGINT) stops a cell resumably: during training the engine checkpoints first, before
it the cell has nothing to lose. The process then exits with the shell's code for that signal
(143, 130) and its result says ``"stopped": true``; the driver records the cell as ``stopped``
(not ``failed``), and rerunning the sweep continues it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustdrop._files import atomic_write_text
from robustdrop.errors import RobustdropError, RunInterrupted
from robustdrop.store.sweep_record import SweepRecord


@dataclass
class CellProcess:
    """A started cell: its process, log file and start time (``time.perf_counter``)."""

    sweep_dir: Path
    cell: str
    proc: subprocess.Popen
    log: Any
    start: float
    stopping: bool = False

    def stop(self) -> None:
        """SIGTERM, once: the run checkpoints and exits (143); the cell is recorded as stopped."""
        if not self.stopping and self.proc.poll() is None:
            self.stopping = True
            self.proc.terminate()


EVALUATION_FILE = "evaluation.csv"  # an evaluate cell's metric rows, in <sweep>/<cell>/


def result_path(sweep_dir: str | os.PathLike, cell: str) -> Path:
    return Path(sweep_dir) / "logs" / f"{cell}.result.json"


def cell_env(threads: int) -> dict[str, str]:
    """The environment of a cell process: this one's, plus the thread budget."""
    env = dict(os.environ)
    n = str(max(1, int(threads)))
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return env


def start_cell(sweep_dir: str | os.PathLike, cell: str, threads: int) -> CellProcess:
    """Start ``cell`` in a new process (see the module docstring); returns at once."""
    record = SweepRecord(sweep_dir, {})
    log_path = record.log_path(cell)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path(sweep_dir, cell).unlink(missing_ok=True)
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by finish_cell
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()}: {cell}, {threads} thread(s)\n")
    log.flush()
    cmd = [sys.executable, "-m", "robustdrop.sweeps", str(Path(sweep_dir).resolve()), cell,
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=cell_env(threads))
    return CellProcess(Path(sweep_dir), cell, proc, log, time.perf_counter())


def finish_cell(started: CellProcess) -> dict[str, Any]:
    """The result of a cell whose process has exited: ``{"ok", "error", "wall_s", "returncode"}``."""
    code = started.proc.wait()
    wall = time.perf_counter() - started.start
    started.log.close()
    path = result_path(started.sweep_dir, started.cell)
    result: dict[str, Any] = {"ok": False, "error": None}
    if path.is_file():
        try:
            result.update(json.loads(path.read_text()))
        except json.JSONDecodeError:
            pass
    if code != 0 and result.get("ok"):
        result["ok"] = False
    if code in (128 + signal.SIGTERM, 128 + signal.SIGINT) or code == -signal.SIGTERM:
        # -SIGTERM: the default handler, before the cell's own was installed: nothing to lose either
        result.update(ok=False, stopped=True, error=result.get("error") or "stopped; rerun the sweep to continue it")
    if not result.get("ok") and not result.get("error"):
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            result["error"] = f"the cell's process was killed by {name}; rerun the sweep to resume it"
        else:
            result["error"] = f"the cell's process exited with status {code}; see {started.log.name}"
    result.update(wall_s=wall, returncode=code)
    return result


def cell_status(result: dict[str, Any]) -> str:
    """The record's status for a cell's result: ``finished``, ``stopped`` or ``failed``."""
    if result.get("ok"):
        return "finished"
    return "stopped" if result.get("stopped") else "failed"


def stop_path(sweep_dir: str | os.PathLike) -> Path:
    """The file that stops a sweep's Ray tasks: the driver writes it at its deadline or when it
    gets SIGTERM (a running task's deadline cannot change; every node sees the shared sweep
    directory) and removes it when it ends."""
    return Path(sweep_dir) / "logs" / ".stop"


def run_cell_blocking(sweep_dir: str, cell: str, threads: int, deadline: float | None = None,
                      poll_s: float = 0.5) -> dict[str, Any]:
    """Run ``cell`` to its end in a new process and return its result (the body of a Ray task):
    not started after ``deadline`` (``time.time()``) or once the driver wrote :func:`stop_path`
    (``{"not_started": true}``), stopped (SIGTERM) at either. Fails with a one-line error when
    ``sweep_dir`` is not visible here (no shared filesystem)."""
    host = socket.gethostname()
    if not (Path(sweep_dir) / "sweep.json").is_file():
        return {"ok": False, "wall_s": 0.0, "host": host,
                "error": f"{sweep_dir} is not visible on host {host}; put --runs-dir on a filesystem every node shares"}

    def over() -> bool:
        return (deadline is not None and time.time() >= deadline) or stop_path(sweep_dir).exists()

    if over():
        return {"ok": False, "not_started": True, "wall_s": 0.0, "host": host, "error": None}
    started = start_cell(sweep_dir, cell, threads)
    while started.proc.poll() is None:
        if over():
            started.stop()
        time.sleep(poll_s)
    result = finish_cell(started)
    result["host"] = host
    return result


def cell_config(record: SweepRecord, cell: str):
    """A training cell's resolved config: ``"@cell"`` values are those cells' run directories."""
    from robustdrop.engine import TrackConfig
    from robustdrop.sweeps.grid import resolve_refs

    return TrackConfig.from_dict(resolve_refs(record.cells[cell]["config"], record.path))


# --------------------------------------------------------------------------------------------
# Inside the cell's process
# --------------------------------------------------------------------------------------------
def _run(sweep_dir: Path, cell: str) -> None:
    from robustdrop.api import ensure, track
    from robustdrop.reuse import decide

    record = SweepRecord.open(sweep_dir)
    if cell not in record.cells:
        raise RobustdropError(f"{sweep_dir}/sweep.json has no cell {cell!r}")
    entry = record.cells[cell]
    if entry.get("kind", "train") == "evaluate":
        _evaluate(record, cell, entry["action"])
        return
    if entry.get("kind") == "replay":
        _replay(record, entry["action"])
        return
    config = cell_config(record, cell)
    if entry.get("rerun") and decide(record.run_dir(cell), config).action == "reuse":
        # A cell it needs ran again (sweeps.runner.mark_stale): this finished result is stale. (A
        # retraining that was stopped resumes as usual.)
        print(f"{cell}: retrain ({entry['rerun']})", flush=True)
        track(config, runs_dir=sweep_dir, name=cell, overwrite=True, progress=False)
        return
    ensure(config, runs_dir=sweep_dir, name=cell, progress=False,
           log=lambda d: print(f"{cell}: {d.action} ({d.why})", flush=True))


def _evaluate(record: SweepRecord, cell: str, action: dict[str, Any]) -> None:
    """An ``evaluate`` cell: the run's checkpoint under the attacks, rows to ``<cell>/evaluation.csv``."""
    from robustdrop.evaluation import evaluate_checkpoint, write_report
    from robustdrop.sweeps.grid import resolve_refs

    options = resolve_refs(action, record.path)
    target = Path(options.pop("run"))
    checkpoint = options.pop("checkpoint", None)
    if checkpoint:
        target = target / "checkpoints" / f"{checkpoint}.pt"
    out = record.run_dir(cell) / EVALUATION_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # a rerun measures again, it does not append
    report = evaluate_checkpoint(target, progress=False, **options)
    print(report.table(), flush=True)
    write_report(report, out)


def replay_options(record: SweepRecord, action: dict[str, Any]) -> dict[str, Any]:
    """A replay cell's :func:`~robustdrop.diagnostics.replay.replay_run` arguments, ``"@cell"``
    values resolved to those cells' run directories (``run`` among them)."""
    from robustdrop.sweeps.grid import resolve_refs

    return resolve_refs(action, record.path)


def _replay(record: SweepRecord, action: dict[str, Any]) -> None:
    """A ``replay`` cell: the diagnostics over the run's per-epoch weights, into its metrics."""
    from robustdrop.diagnostics.replay import replay_run

    options = replay_options(record, action)
    path = replay_run(options.pop("run"), progress=False, **options)
    print(f"replayed into {path}", flush=True)


def _stop_before_training(signum: int, frame: Any) -> None:
    raise RunInterrupted(signum, f"stopped by {signal.Signals(signum).name} before training")


def main(argv: Sequence[str] | None = None) -> int:
    """The cell's process; exits 0 (finished), 1 (failed) or 128 + signal (stopped, resumable)."""
    # until the trainer installs its own (checkpointing) handler, and after it restores this one
    signal.signal(signal.SIGTERM, _stop_before_training)
    parser = argparse.ArgumentParser(prog="python -m robustdrop.sweeps", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("cell")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    result: dict[str, Any] = {"ok": True, "error": None, "pid": os.getpid(), "host": socket.gethostname()}
    code = 0
    try:
        _run(args.sweep_dir, args.cell)
    except RobustdropError as exc:
        result.update(ok=False, error=str(exc))
        print(f"robustdrop: error: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt as exc:  # RunInterrupted (checkpoint written) or a SIGINT outside training
        signum = exc.signum if isinstance(exc, RunInterrupted) else int(signal.SIGINT)
        code = 128 + signum
        result.update(ok=False, stopped=True,
                      error=f"stopped by {signal.Signals(signum).name}; rerun the sweep to continue it")
        print(f"robustdrop: {exc or 'interrupted'}", file=sys.stderr, flush=True)
    except Exception as exc:  # any bug in a cell is that cell's failure, not the sweep's
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        result.update(ok=False, error=f"{type(exc).__name__}: {first}", traceback=traceback.format_exc())
        traceback.print_exc()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the outcome is known: a late SIGTERM must not lose its record
    atomic_write_text(result_path(args.sweep_dir, args.cell), json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else code or 1


if __name__ == "__main__":
    sys.exit(main())
