"""The Ray backend: each cell is a Ray task asking for its CPUs (and GPUs) on a Ray cluster.

Ray does the scheduling; a task runs the cell exactly as the local backend does (a fresh process,
:func:`~robustdrop.sweeps.worker.run_cell_blocking`) on whichever node Ray picks, so **the sweep
directory must be on a filesystem every node shares** (NFS, a cluster filesystem): the cells
write their run directories there and the driver reads them. Before any cell starts, one small
task per node writes a token file into the sweep directory and the driver checks that it sees it;
a node that cannot is a one-line error. The nodes need robustdrop (and its data cache or
``--data-dir``) installed as on the driver.

    ray start --head --port 6379                      # on the head node
    ray start --address HEAD:6379                     # on every other node
    robustdrop sweep ... --backend ray --address HEAD:6379 --runs-dir /shared/runs
"""

from __future__ import annotations

import secrets
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustdrop.errors import RobustdropError
from robustdrop.sweeps.schedule import Schedule
from robustdrop.sweeps.worker import cell_status, run_cell_blocking, stop_path


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RobustdropError("--backend ray needs Ray on this machine and every node: "
                              "pip install 'robustdrop[cluster]'") from None
    return ray


def _write_token(folder: str, token: str) -> str:
    """(A Ray task) write ``<folder>/<token>`` and return this node's host name."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / token).write_text(socket.gethostname())
    except OSError:
        pass  # the driver will not find the file and say so
    return socket.gethostname()


def check_shared_filesystem(ray: Any, sweep_dir: Path) -> None:
    """One task per alive node writes a token into ``sweep_dir``; every token must be visible here."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = sweep_dir / ".ray-check"
    writer = ray.remote(num_cpus=0, max_retries=0)(_write_token)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    tokens = {}
    for node in nodes:
        token = f"{node['NodeID'][:12]}-{secrets.token_hex(4)}"
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        tokens[token] = (node.get("NodeManagerAddress", "?"),
                         writer.options(scheduling_strategy=strategy).remote(str(folder), token))
    try:
        for token, (address, ref) in tokens.items():
            host = ray.get(ref, timeout=120)
            if not (folder / token).is_file():
                raise RobustdropError(
                    f"the sweep directory {sweep_dir} is not shared with Ray node {address} ({host}): a file a task "
                    "wrote there is not visible here; put --runs-dir on a filesystem every node shares")
    finally:
        for token in tokens:
            (folder / token).unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def run_ray(
    sweep_dir: Path,
    schedule: Schedule,
    *,
    address: str | None,
    cpus_per_cell: float,
    gpus_per_cell: float,
    threads: int,
    on_start: Callable[..., None],
    on_done: Callable[[str, dict[str, Any]], None],
    poll_s: float = 1.0,
) -> None:
    """Submit each cell as a Ray task once the cells it needs finished (``num_cpus=cpus_per_cell``,
    ``num_gpus=gpus_per_cell``: 0.25 puts four cells on one GPU; no retries: a rerun of the sweep
    resumes a failed cell) and report each as it ends. Ready cells are all submitted at once, in
    the sweep's order; Ray starts them as resources free up. The deadline (``schedule.deadline``)
    travels with each task: one that would start after it does not (``not_started``), a running
    one is stopped with SIGTERM by its task. Once the schedule is past its deadline by this
    machine's clock (also the one a SIGTERM to the driver sets: ``schedule.stop``) the driver
    writes :func:`~robustdrop.sweeps.worker.stop_path`, which stops the tasks the same way, and
    waits for them.

    ``address``: ``HOST:PORT`` of a running cluster's head (``None``: Ray's own default, i.e.
    ``$RAY_ADDRESS``, else a new single-machine instance).
    """
    ray = _import_ray()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RobustdropError(f"cannot connect to the Ray cluster at {address or 'the default address'} ({first}); "
                              "check --address HOST:PORT (`ray status` on the head)") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            # ray.init makes SIGTERM sys.exit(), which would leave the tasks' cells running: keep
            # the driver's (run_sweep's: stop the cells first)
            signal.signal(signal.SIGTERM, handler)
    stop_file = stop_path(sweep_dir)
    stop_file.unlink(missing_ok=True)  # left by a driver that was killed
    try:
        check_shared_filesystem(ray, sweep_dir)
        task = ray.remote(run_cell_blocking).options(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=0)
        refs: dict[Any, str] = {}
        while True:
            for cell, dep in schedule.blocked():
                on_done(cell, {"ok": False, "error": f"not run: it needs cell {dep}, which did not finish",
                               "wall_s": 0.0})
            while (cell := schedule.next_ready()) is not None:
                refs[task.remote(str(sweep_dir), cell, threads, schedule.deadline)] = cell
                on_start(cell, host="ray", pid=None)
            if not refs:
                break
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=poll_s)
            if not ready:
                if schedule.past_deadline() and not stop_file.exists():
                    stop_file.parent.mkdir(parents=True, exist_ok=True)
                    stop_file.touch()
                continue
            cell = refs.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # a lost node, a worker that died: this cell's failure
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                result = {"ok": False, "error": f"Ray task failed: {first}", "wall_s": float("nan")}
            schedule.done(cell, "stopped" if result.get("not_started") else cell_status(result))
            on_done(cell, result)
    finally:
        stop_file.unlink(missing_ok=True)
        ray.shutdown()
