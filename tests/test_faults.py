"""Environment faults are user errors: disk full, permission denied, a read-only runs directory, a
missing or corrupt cache file, a damaged metrics.parquet / events.jsonl in a run being resumed.

Each gives one line that names the file and what to do, a non-zero exit, the last good checkpoint
and logs intact, and ``--resume`` continues from them once the cause is fixed, to the metrics of
an uninterrupted run. Where the platform allows it the fault is real (a size-limited or read-only
tmpfs in a private mount namespace, ``unshare -rm``; ``chmod`` when not root, since root ignores
it); otherwise an ``OSError`` is injected at the write call.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

import robustdrop._files as files
from robustdrop.api import resume, track
from robustdrop.cli import main
from robustdrop.data import load_dataset
from robustdrop.engine import Hook, make_config
from robustdrop.errors import FileWriteError, RobustdropError
from robustdrop.store import RunStore


def folder_config(image_folder, **overrides):
    values = dict(dataset=f"folder:{image_folder}", model="cnn1", width=2, epochs=3, batch_size=32, val_size=32,
                  probe_size=32, optimizer="adam", lr=0.003, eval_pgd_steps=1, diagnostics=["none"], threads=1)
    values.update(overrides)
    return make_config(**values)


def comparable(path) -> pd.DataFrame:
    frame = RunStore.open(path).metrics()
    return frame[~frame.metric.str.startswith("time")].reset_index(drop=True)


def files_of(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class FaultAt(Hook):
    """Arms ``fault()`` at the end of ``epoch`` (after its evaluation): the epoch's own writes
    (metrics, checkpoint) are the first to meet it."""

    name = "fault"

    def __init__(self, epoch, fault):
        super().__init__(every_n_epochs=1)
        self.epoch, self.fault = epoch, fault

    def on_epoch_end(self, run, epoch):
        if epoch == self.epoch:
            self.fault()


@pytest.fixture
def failing_writes(monkeypatch):
    """``arm(code)``: from then on every atomic write fails with ``OSError(code)`` at the write call."""
    armed = {}
    real = files._create_temp

    def create_temp(path):
        if "code" in armed:
            raise OSError(armed["code"], os.strerror(armed["code"]), str(path))
        return real(path)

    monkeypatch.setattr(files, "_create_temp", create_temp)

    class Control:
        def arm(self, code):
            armed["code"] = code

        def disarm(self):
            armed.pop("code", None)

    return Control()


def _permission_fault(run_dir, failing_writes):
    """A real `chmod a-w` when it binds (not root), else an injected EACCES."""
    if os.geteuid() != 0:
        def fault():
            for p in [run_dir, *run_dir.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
        return fault, lambda: [p.chmod(0o755) for p in [run_dir, *run_dir.rglob("*")] if p.is_dir()]
    return (lambda: failing_writes.arm(errno.EACCES)), failing_writes.disarm


@pytest.mark.parametrize("fault", ["disk-full", "permission-denied"])
def test_write_fault_mid_run_is_one_line_keeps_the_checkpoint_and_resume_continues(
        fault, image_folder, folder_cache, failing_writes, tmp_path, one_thread):
    data = load_dataset(f"folder:{image_folder}")
    cfg = folder_config(image_folder)
    straight = track(cfg, runs_dir=tmp_path, name="straight", data=data, progress=False)
    run_dir = tmp_path / "r"
    if fault == "disk-full":
        arm, disarm = (lambda: failing_writes.arm(errno.ENOSPC)), failing_writes.disarm
    else:
        arm, disarm = _permission_fault(run_dir, failing_writes)
    with pytest.raises(FileWriteError) as failed:
        track(cfg, runs_dir=tmp_path, name="r", data=data, progress=False, hooks=[FaultAt(2, arm)])
    disarm()
    message = str(failed.value)
    assert len(message.splitlines()) == 1 and "metrics.parquet" in message and f"--resume {run_dir}" in message
    assert ("free disk space" if fault == "disk-full" else "writable") in message
    # the last good checkpoint (epoch 1) and the logs up to it are intact; nothing torn, no temporary file
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert RunStore.open(run_dir).metrics().epoch.max() == 1
    assert not [p for p in run_dir.rglob(".*.tmp")] and not (run_dir / ".lock").exists()
    resume(run_dir, data=data, progress=False)
    pd.testing.assert_frame_equal(comparable(straight.path), comparable(run_dir))


def test_unwritable_runs_dir_at_start_is_one_line_and_creates_nothing(image_folder, folder_cache, tmp_path, capsys,
                                                                      monkeypatch):
    runs = tmp_path / "readonly"
    runs.mkdir()
    if os.geteuid() != 0:
        runs.chmod(0o555)
    else:  # root ignores the mode: the file system's answer is injected at the mkdir
        real_mkdir = type(runs).mkdir

        def mkdir(self, *args, **kwargs):
            if str(self).startswith(str(runs)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(type(runs), "mkdir", mkdir)
    code = main(["track", "--dataset", f"folder:{image_folder}", "--model", "cnn1", "--width", "2", "--epochs", "1",
                 "--batch-size", "32", "--val-size", "32", "--probe-size", "32", "--diagnostics", "none",
                 "--no-progress", "--runs-dir", str(runs), "--name", "r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(runs) in err[0] and "writable" in err[0], err
    assert list(runs.iterdir()) == []


@pytest.fixture
def resumable_run(image_folder, folder_cache, tmp_path, one_thread):
    """A 3-epoch run stopped (as by a kill) in epoch 2, and the uninterrupted run to compare with."""

    class Kill(Hook):
        name = "kill"

        def __init__(self):
            super().__init__(every_n_steps=1)

        def on_train_step(self, run, batch, out):
            if run.epoch == 2:
                raise KeyboardInterrupt

    data = load_dataset(f"folder:{image_folder}")
    cfg = folder_config(image_folder)
    straight = track(cfg, runs_dir=tmp_path, name="straight", data=data, progress=False)
    with pytest.raises(KeyboardInterrupt):
        track(cfg, runs_dir=tmp_path, name="r", data=data, progress=False, hooks=[Kill()])
    return tmp_path / "r", straight.path


def _resume_cli(run_dir, capsys):
    code = main(["track", "--resume", str(run_dir), "--no-progress"])
    return code, capsys.readouterr()


@pytest.mark.parametrize("damage,fix,words", [
    ("metrics.parquet", lambda run: (run / "metrics.parquet").unlink(), ["metrics.parquet", "metrics.csv"]),
    ("events.jsonl", lambda run: (run / "events.jsonl").write_text(
        "".join(line + "\n" for line in (run / "events.jsonl").read_text().splitlines() if "garbage" not in line)),
     ["events.jsonl line 2", "delete that line"]),
])
def test_damaged_log_of_a_run_being_resumed_is_one_line_then_resume_continues(damage, fix, words, resumable_run,
                                                                              capsys):
    run_dir, straight = resumable_run
    target = run_dir / damage
    if damage == "metrics.parquet":
        target.write_bytes(b"PAR1 this is not a parquet file")
    else:
        lines = target.read_text().splitlines()
        target.write_text("\n".join([lines[0], '{"kind": "garbage', *lines[1:]]) + "\n")
    before = files_of(run_dir)
    code, out = _resume_cli(run_dir, capsys)
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    assert files_of(run_dir) == before  # checkpoint and logs untouched
    fix(run_dir)
    code, out = _resume_cli(run_dir, capsys)
    assert code == 0, out.err
    pd.testing.assert_frame_equal(comparable(straight), comparable(run_dir))


def test_log_that_lost_rows_is_refused(resumable_run, capsys):
    run_dir, _ = resumable_run
    for name in ("metrics.parquet", "metrics.csv"):
        (run_dir / name).unlink()
    code, out = _resume_cli(run_dir, capsys)
    assert code == 2 and "holds 0 rows but the checkpoint was written after" in out.err


def test_corrupt_checkpoint_of_a_run_being_resumed_is_one_line(resumable_run, capsys):
    run_dir, _ = resumable_run
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:500])
    code, out = _resume_cli(run_dir, capsys)
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "last.pt" in err[0] and "epoch_XXXX.pt" in err[0], err


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_dataset_cache_is_rebuilt(damage, image_folder, folder_cache, tmp_path, capsys):
    load_dataset(f"folder:{image_folder}")  # make sure the cache file exists
    (cache_file,) = folder_cache.glob("folder-*.pt")
    if damage == "missing":
        cache_file.unlink()
    else:
        cache_file.write_bytes(b"not a cache")
    code = main(["track", "--dataset", f"folder:{image_folder}", "--model", "cnn1", "--width", "2", "--epochs", "1",
                 "--batch-size", "32", "--val-size", "32", "--probe-size", "32", "--diagnostics", "none",
                 "--threads", "1", "--no-progress", "--runs-dir", str(tmp_path), "--name", "r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    if damage == "corrupt":
        assert len(err) == 1 and err[0].startswith("robustdrop: warning: ignoring unreadable dataset cache")
    else:
        assert err == []
    assert torch.load(cache_file, weights_only=True)["format"] == 1  # rebuilt


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_run_files_get_the_umask_permissions(umask, image_folder, folder_cache, tmp_path, one_thread):
    data = load_dataset(f"folder:{image_folder}")
    old = os.umask(umask)
    try:
        store = track(folder_config(image_folder, epochs=1, diagnostics=["default"]), runs_dir=tmp_path / "runs",
                      name="r", data=data, progress=False)
    finally:
        os.umask(old)
    paths = [store.path, *store.path.rglob("*")]
    assert any(p.suffix == ".npz" for p in paths) and any(p.suffix == ".pt" for p in paths)
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o777 if p.is_dir() else 0o666) & ~umask, (p, oct(mode))


# ---------------------------------------------------------------------------------------------
# real faults: a private tmpfs (size-limited, then read-only) where user namespaces allow it
# ---------------------------------------------------------------------------------------------
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                           capture_output=True)
    return probe.returncode == 0


DRIVER = textwrap.dedent('''
    # Runs in a private mount namespace (unshare -rm): its mounts vanish with it.
    import json, os, shutil, subprocess, sys, time
    work, flags = sys.argv[1], json.loads(sys.argv[2])
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt], check=True)
    cli = [sys.executable, "-m", "robustdrop", "track"]
    out = {}
    # 1. disk full in the middle of the run: fill the file system once epoch 1 is checkpointed
    proc = subprocess.Popen(cli + flags + ["--runs-dir", mnt, "--name", "r"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = os.path.join(mnt, "r", "checkpoints", "last.pt")
    while not os.path.exists(last) and proc.poll() is None:
        time.sleep(0.005)
    filler = os.path.join(mnt, "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\\0" * 4096)  # page by page: nothing left over
        except OSError:
            pass
    _, err = proc.communicate()
    out["full"] = {"code": proc.returncode, "err": err}
    out["left_behind"] = [n for n in os.listdir(os.path.join(mnt, "r")) if n.endswith(".tmp") or n == ".lock"]
    os.remove(filler)  # space freed
    done = subprocess.run(cli + ["--resume", os.path.join(mnt, "r"), "--no-progress", "--threads", "1"],
                          capture_output=True, text=True)
    out["resume"] = {"code": done.returncode, "err": done.stderr}
    shutil.copytree(os.path.join(mnt, "r"), os.path.join(work, "r"))
    # 2. a read-only runs directory at the start
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    ro = subprocess.run(cli + flags + ["--runs-dir", os.path.join(mnt, "runs"), "--name", "x"], capture_output=True,
                        text=True)
    out["readonly"] = {"code": ro.returncode, "err": ro.stderr, "listing": sorted(os.listdir(mnt))}
    print(json.dumps(out))
''')


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespaces for a private tmpfs here")
def test_real_disk_full_and_read_only_file_system(image_folder, folder_cache, tmp_path, robustdrop_env, one_thread):
    flags = ["--dataset", f"folder:{image_folder}", "--model", "cnn1", "--width", "2", "--epochs", "4",
             "--batch-size", "16", "--val-size", "32", "--probe-size", "32", "--optimizer", "adam", "--lr", "0.003",
             "--eval-pgd-steps", "1", "--diagnostics", "none", "--threads", "1", "--no-progress"]
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", DRIVER, str(tmp_path), json.dumps(flags)],
                          capture_output=True, text=True, env=robustdrop_env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    full = out["full"]["err"].strip().splitlines()
    assert out["full"]["code"] == 2 and len(full) == 1, full
    assert "No space left on device" in full[0] and "free disk space" in full[0] and "--resume" in full[0]
    assert out["left_behind"] == []  # no temporary file, no lock
    assert out["resume"]["code"] == 0, out["resume"]["err"]
    ro = out["readonly"]["err"].strip().splitlines()
    assert out["readonly"]["code"] == 2 and len(ro) == 1 and "Read-only file system" in ro[0], ro
    assert "runs" not in out["readonly"]["listing"]
    data = load_dataset(f"folder:{image_folder}")
    straight = track(folder_config(image_folder, epochs=4, batch_size=16), runs_dir=tmp_path, name="straight",
                     data=data, progress=False)
    pd.testing.assert_frame_equal(comparable(straight.path), comparable(tmp_path / "r"))


def test_failed_start_after_the_run_directory_was_made_removes_it(image_folder, folder_cache, tmp_path, one_thread):
    """A check that only a hook can make (here: on_run_start) fails after the folder exists."""

    class Refuse(Hook):
        name = "refuse"

        def on_run_start(self, run):
            raise RobustdropError("this hook refuses the run")

    data = load_dataset(f"folder:{image_folder}")
    with pytest.raises(RobustdropError, match="refuses"):
        track(folder_config(image_folder), runs_dir=tmp_path / "runs", name="r", data=data, progress=False,
              hooks=[Refuse()])
    assert not (tmp_path / "runs").exists()
