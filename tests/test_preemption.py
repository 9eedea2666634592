"""Preemption and one writer per run.

SIGINT / SIGTERM: the run finishes its step, writes a mid-epoch checkpoint, raises RunInterrupted
(the CLI exits 130 / 143 with one line saying how to resume), and ``--resume`` reproduces the
uninterrupted run's metrics exactly. In-process tests send real signals to this process from a
hook (fast, synthetic data); one test sends SIGTERM to a real ``robustdrop track`` subprocess.

The run lock: a second writer refuses with one line; a lock left by a killed process does not
block a later resume.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from helpers_runs import small_config

from robustdrop.api import resume, track
from robustdrop.cli import main
from robustdrop.engine import Hook, make_config
from robustdrop.errors import RobustdropError, RunInterrupted
from robustdrop.store import RunLock, RunStore


def comparable(store: RunStore) -> pd.DataFrame:
    """Metrics without wall-clock rows (the only ones allowed to differ between runs)."""
    frame = RunStore.open(store.path).metrics()
    return frame[~frame.metric.str.startswith("time")].reset_index(drop=True)


class SignalAt(Hook):
    """Sends a real signal to this process after optimizer step ``step`` or at the end of ``epoch``
    (after the diagnostics before it in running order have run: the evaluation phase)."""

    name = "signal"

    def __init__(self, signum, *, step=None, epoch=None):
        super().__init__(every_n_steps=1 if step else 0, every_n_epochs=1 if epoch else 0)
        self.signum, self.step, self.epoch = signum, step, epoch

    def on_train_step(self, run, batch, out):
        if run.step == self.step:
            signal.raise_signal(self.signum)

    def on_epoch_end(self, run, epoch):
        if epoch == self.epoch:
            signal.raise_signal(self.signum)


STEPS = 448 // 64  # per epoch: 512 synthetic examples, 64 held out


@pytest.mark.parametrize("method,diagnostics,signum,where", [
    # mid-epoch, with the strength diagnostic's per-step means in flight (sampled every 2 steps)
    ("rs-fgsm", ["strength:train_every=2,n=64", "collapse"], signal.SIGTERM, {"step": 2 * STEPS + 3}),
    # APART's ψ, Ω, its optimizer and its epoch statistics
    ("fgsm+", ["none"], signal.SIGINT, {"step": STEPS + 5}),
    # during the epoch's end, after strength and collapse already ran: they are rolled back
    ("fgsm", ["strength:n=64", "collapse"], signal.SIGTERM, {"epoch": 2}),
], ids=["rs-fgsm-mid-epoch", "apart-mid-epoch", "during-evaluation"])
def test_signal_checkpoints_mid_epoch_and_resume_is_exact(method, diagnostics, signum, where, synthetic_data, tmp_path,
                                                          one_thread):
    cfg = small_config(method=method, diagnostics=diagnostics)
    straight = track(cfg, runs_dir=tmp_path, name="straight", data=synthetic_data, progress=False)
    with pytest.raises(RunInterrupted) as stopped:
        track(cfg, runs_dir=tmp_path, name="stopped", data=synthetic_data, progress=False,
              hooks=[SignalAt(signum, **where)])
    assert stopped.value.exit_code == 128 + signum
    assert "--resume" in str(stopped.value) and len(str(stopped.value).splitlines()) == 1
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    partial = state["partial_epoch"]
    if "step" in where:  # stopped right after that step, inside its epoch
        assert state["step"] == where["step"] and 0 < partial["steps_done"] < STEPS
    else:  # all the epoch's steps done, its evaluation to run again
        assert state["epoch"] == where["epoch"] - 1 and partial["steps_done"] == STEPS
    resumed = resume(tmp_path / "stopped", data=synthetic_data, progress=False)
    pd.testing.assert_frame_equal(comparable(straight), comparable(resumed))
    kinds = [e["kind"] for e in RunStore.open(resumed.path).events() if e["kind"] != "estimate"]
    assert kinds.count("resume") == 1  # and otherwise the uninterrupted run's events, none twice or lost:
    assert [k for k in kinds if k != "resume"] == [e["kind"] for e in straight.events() if e["kind"] != "estimate"]


@pytest.mark.parametrize("where", [{"step": 2 * STEPS + 3}, {"epoch": 2}], ids=["after-switch", "during-switch-epoch"])
def test_signal_around_a_method_switch_resumes_exactly(where, synthetic_data, tmp_path, one_thread):
    """--on-collapse switch (issue 12) and preemption: the switch is in the mid-epoch checkpoint
    (SIGTERM in epoch 3, after it), and a SIGTERM during the epoch end whose detector asked for the
    switch rolls the request back with the rest of that epoch end; resume redoes both exactly."""
    from test_early_warning import switching_hooks
    from test_engine import small_config as engine_config

    cfg = engine_config(epochs=3, method="fgsm", on_collapse="switch", switch_to="pgd:pgd_steps=2")
    straight = track(cfg, runs_dir=tmp_path, name="straight", data=synthetic_data, progress=False,
                     hooks=switching_hooks())
    assert [e["epoch"] for e in straight.events("method_switch")] == [2]
    with pytest.raises(RunInterrupted):
        track(cfg, runs_dir=tmp_path, name="stopped", data=synthetic_data, progress=False,
              hooks=[*switching_hooks(), SignalAt(signal.SIGTERM, **where)])
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    assert state["switches"] == ([{"epoch": 2, "to": "pgd:pgd_steps=2"}] if "step" in where else [])
    resumed = resume(tmp_path / "stopped", data=synthetic_data, progress=False, hooks=switching_hooks())
    pd.testing.assert_frame_equal(comparable(straight), comparable(resumed))
    kinds = [e["kind"] for e in RunStore.open(resumed.path).events() if e["kind"] not in ("estimate", "resume")]
    assert kinds == [e["kind"] for e in straight.events() if e["kind"] != "estimate"]
    assert resumed.load_checkpoint("last")["switches"] == [{"epoch": 2, "to": "pgd:pgd_steps=2"}]


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(synthetic_data, tmp_path, one_thread):
    class Twice(SignalAt):
        def on_train_step(self, run, batch, out):
            if run.step == self.step:
                signal.raise_signal(self.signum)
                signal.raise_signal(self.signum)

    cfg = small_config(epochs=2)
    # what the handlers were before (SIGINT is ignored when the suite runs in the background under nohup)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt) as stopped:
        track(cfg, runs_dir=tmp_path, name="r", data=synthetic_data, progress=False,
              hooks=[Twice(signal.SIGINT, step=STEPS + 2)])
    assert not isinstance(stopped.value, RunInterrupted)  # no new checkpoint: epoch 1's is the last
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored


@pytest.mark.parametrize("previous", [signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler])
def test_interrupts_restore_whatever_handler_was_there(previous):
    """An ignored SIGINT (``nohup``, a background job) stays ignored after a run; the default stays default."""
    from robustdrop.engine.interrupt import Interrupts

    saved = signal.signal(signal.SIGINT, previous)
    try:
        with Interrupts() as stop:
            assert signal.getsignal(signal.SIGINT) == stop._handle  # the run's own while it trains
            signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) == previous
    finally:
        signal.signal(signal.SIGINT, saved)


def _wait_for_line(proc, text, timeout=300):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no line with {text!r} in the output: {''.join(lines)[-2000:]}")


@pytest.mark.slow
def test_sigterm_to_a_real_run_mid_epoch_then_resume_matches_uninterrupted(tmp_path, cifar10_jpeg,
                                                                           cifar10_jpeg_cache_dir, robustdrop_env,
                                                                           one_thread):
    """`kill -TERM` a CLI run in the middle of an epoch: exit 143, one line saying how to resume,
    a mid-epoch checkpoint; `--resume` then gives the metrics of the uninterrupted run."""
    flags = dict(train_subset=4000, val_size=200, probe_size=100, epochs=2, eval_pgd_steps=3,
                 diagnostics=["strength:n=100,train_every=7"], threads=1)
    straight = track(make_config("quick", **flags), runs_dir=tmp_path, name="straight", data=cifar10_jpeg,
                     progress=False)
    env = {**robustdrop_env, "ROBUSTDROP_CACHE": str(cifar10_jpeg_cache_dir), "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "robustdrop", "track"]
    proc = subprocess.Popen(cli + ["--preset", "quick", "--train-subset", "4000", "--val-size", "200", "--probe-size",
                                   "100", "--epochs", "2", "--eval-pgd-steps", "3", "--diagnostics",
                                   "strength:n=100,train_every=7", "--threads", "1", "--no-progress", "--runs-dir",
                                   str(tmp_path), "--name", "stopped"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_line(proc, "cost estimate")  # printed after 6 of the epoch's 31 steps: mid-epoch 1
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert len(err.strip().splitlines()) == 1 and "SIGTERM" in err and "--resume" in err, err
    partial = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)["partial_epoch"]
    assert 0 < partial["steps_done"] < 31  # a mid-epoch checkpoint

    done = subprocess.run(cli + ["--resume", str(tmp_path / "stopped"), "--no-progress", "--threads", "1"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "in epoch 1 after step" in done.stdout
    pd.testing.assert_frame_equal(comparable(straight), comparable(RunStore(tmp_path / "stopped")))


# ---------------------------------------------------------------------------------------------
# one writer per run
# ---------------------------------------------------------------------------------------------
def test_a_second_writer_of_a_run_is_refused_with_one_line(synthetic_data, tmp_path, capsys, one_thread):
    track(small_config(epochs=1), runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    with RunLock(tmp_path / "r"):  # as a first `--resume` (or sweep cell) would hold it
        code = main(["track", "--resume", str(tmp_path / "r"), "--epochs", "2", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert "in use by another robustdrop process" in err[0] and f"pid {os.getpid()}" in err[0]
        with pytest.raises(RobustdropError, match="in use"):  # a new run over it (--overwrite) too
            track(small_config(epochs=1), runs_dir=tmp_path, name="r", overwrite=True, data=synthetic_data,
                  progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    assert after == before and not (tmp_path / "r" / ".lock").exists()


def test_a_lock_left_by_a_killed_process_does_not_block_resume(synthetic_data, tmp_path, one_thread, robustdrop_env):
    track(small_config(epochs=1), runs_dir=tmp_path, name="r", data=synthetic_data, progress=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from robustdrop.store import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
         str(tmp_path / "r")], stdout=subprocess.PIPE, text=True, env=robustdrop_env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RobustdropError, match=f"pid {holder.pid}"):
            RunLock(tmp_path / "r").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "r" / ".lock").exists()  # left behind by the killed holder ...
    store = resume(tmp_path / "r", data=synthetic_data, progress=False)  # ... and no obstacle
    assert store is not None and not (tmp_path / "r" / ".lock").exists()


def test_lock_without_flock_falls_back_to_exclusive_creation(tmp_path, monkeypatch):
    """File systems without locks (NFS without lockd, Lustre without -o flock): O_EXCL lock file,
    taken over when its holder is a dead process of this host."""
    from robustdrop.store import lock as lock_module

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RobustdropError, match=r"in use .*delete .*\.lock"):
        RunLock(tmp_path).acquire()
    first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with RunLock(tmp_path):  # the dead holder's lock is taken over
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_waiting_lock_waits_for_the_holder_instead_of_refusing(tmp_path, capsys):
    """Sweep cells of one setting share an auto referee: the second waits for the first's training."""
    import threading

    first = RunLock(tmp_path, name=".ref.lock").acquire()
    got = threading.Event()

    def second():
        with RunLock(tmp_path, name=".ref.lock", wait="waiting for the referee"):
            got.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.5)
    assert not got.is_set()  # still held by the first
    first.release()
    waiter.join(timeout=10)
    assert got.is_set() and "waiting for the referee (pid" in capsys.readouterr().out
    with pytest.raises(RobustdropError, match="in use"), RunLock(tmp_path, name=".ref.lock"), RunLock(tmp_path, name=".ref.lock"):
        pass  # without wait=, a second holder still refuses
