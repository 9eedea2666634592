"""Bad input on the command line: every invocation below ends with exit status 2, exactly one line on
stderr, no traceback, the runs directory byte for byte as it was and no data directory created.

The command line runs in-process (``robustdrop.cli.main``) so that the whole list takes seconds;
a few invocations also run as real subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustdrop.cli import main


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): the runs directory's state."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, image_folder):
    """A runs directory with one finished 1-epoch run (``cyclic`` schedule) on the image folder."""
    runs = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.getbasetemp() / "folder-cache"
    cache.mkdir(exist_ok=True)
    old = os.environ.get("ROBUSTDROP_CACHE")
    os.environ["ROBUSTDROP_CACHE"] = str(cache)
    try:
        code = main(["track", *tiny_flags(image_folder), "--runs-dir", str(runs), "--name", "existing"])
    finally:
        if old is None:
            os.environ.pop("ROBUSTDROP_CACHE")
        else:
            os.environ["ROBUSTDROP_CACHE"] = old
    assert code == 0
    return runs


def tiny_flags(image_folder: Path) -> list[str]:
    return ["--dataset", f"folder:{image_folder}", "--model", "cnn1", "--width", "2", "--epochs", "1",
            "--batch-size", "64", "--val-size", "32", "--probe-size", "32", "--eval-pgd-steps", "1",
            "--diagnostics", "none", "--no-progress", "--threads", "1"]


# (flags, a word the one line must contain). {runs}, {tmp}, {folder}: filled in by the test.
BAD = [
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--epsilon", "nan"], "epsilon"),
    (["--epsilon", "2"], "--epsilon"),
    (["--epsilon", "0"], "--epsilon"),
    (["--epsilon", "eight"], "epsilon"),
    (["--epsilon", "1/0"], "epsilon"),
    (["--alpha", "-1/255"], "--alpha"),
    (["--alpha", "inf"], "alpha"),
    (["--eval-epsilon", "0"], "--eval-epsilon"),
    (["--eval-pgd-step-size", "0"], "--eval-pgd-step-size"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "2.5"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--momentum", "1.5"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--width", "0"], "--width"),
    (["--pad-value", "2"], "--pad-value"),
    (["--lr-peak-at", "2"], "--lr-peak-at"),
    (["--cycle-epochs", "0"], "--cycle-epochs"),
    (["--schedule", "piecewise", "--lr-milestones", "0.5", "1.5"], "--lr-milestones"),
    (["--lr-milestones", "nan"], "--lr-milestones"),
    (["--threads", "-1"], "--threads"),
    (["--schedule", "wavy"], "--schedule"),
    (["--method", "sgd-magic"], "--method"),
    (["--model", "resnet9000"], "resnet9000"),
    (["--preset", "huge"], "--preset"),
    (["--no-such-flag"], "no-such-flag"),
    (["--dataset", "imagenet-21k"], "imagenet-21k"),
    (["--dataset", "folder:"], "folder:"),
    (["--dataset", "folder:{tmp}/no-such-tree"], "no-such-tree"),
    (["--dataset", "folder:{tmp}/empty"], "train/"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/no-data-here"], "no-data-here"),
    (["--device", "tpu"], "--device"),
    (["--diagnostics", "telepathy"], "telepathy"),
    (["--diagnostics", "collapse:patience=0"], "patience"),
    (["--diagnostics", "default", "--reference", "{tmp}/no-reference"], "no-reference"),
    (["--diagnostics", "default", "--reference", "{tmp}/notes.txt"], "notes.txt"),
    (["--diagnostics", "default", "--reference", "{tmp}/passwd"], "passwd is not a complete checkpoint"),  # was torch's "list index out of range"
    (["--probe-size", "100000"], "--probe-size"),
    (["--val-size", "100000"], "--val-size"),
    (["--train-subset", "100000"], "--train-subset"),
    (["--batch-size", "100000"], "--batch-size"),
    (["--name", "existing"], "--resume"),
    (["--runs-dir", "{tmp}/notes.txt"], "notes.txt"),
    (["--resume", "{runs}/existing", "--lr", "0.1"], "--lr"),
    (["--resume", "{runs}/existing", "--epochs", "3"], "cyclic-repeat"),
    (["--resume", "{runs}/no-such-run"], "not a robustdrop run directory"),
    (["--resume", "{runs}/existing", "--dry-run"], "--dry-run"),
    # flags of the referee (issue 8) and the early-warning switch (issue 12)
    (["--on-collapse", "switch"], "--switch-to"),
    (["--on-collapse", "switch", "--switch-to", "telekinesis"], "telekinesis"),
    (["--on-collapse", "switch", "--switch-to", "pgd:pgd_steps=two"], "pgd_steps"),
    (["--eval-precision", "fp16"], "--eval-precision"),
    (["--diagnostics", "default", "--reference", "builtin:nosuch"], "builtin:nosuch"),
    (["--alpha", "2.6/0"], "alpha"),
]


def fill(args: list[str], **paths: Path) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]


def test_at_least_thirty_bad_invocations():
    assert len(BAD) >= 30


@pytest.mark.parametrize("flags,word", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_invocation_is_one_line_and_changes_nothing(flags, word, existing_run, image_folder, folder_cache,
                                                        tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    runs_before = tree(existing_run)
    tmp_before = tree(tmp_path)
    args = fill(flags, runs=existing_run, tmp=tmp_path)
    # The case's flags come last: argparse keeps the last value of a repeated flag.
    base = ["--no-progress"] if "--resume" in args else tiny_flags(image_folder)
    code = main(["track", *base, "--runs-dir", str(existing_run), *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and word in lines[0]
    assert tree(existing_run) == runs_before
    assert tree(tmp_path) == tmp_before  # no data directory (or anything else) created
    if "--reference" in args and args[-1].endswith(("notes.txt", "passwd")):
        assert "resume" not in lines[0]  # the message fits what the user did
        assert "is not a complete checkpoint (not a zip archive as torch.save writes" in lines[0]  # no torch internals


def test_decimal_numerators_and_fractions_are_read():
    from robustdrop.engine.config import parse_fraction

    assert parse_fraction("2.6/255") == pytest.approx(2.6 / 255)
    assert parse_fraction(" 8 / 255 ") == pytest.approx(8 / 255)
    assert parse_fraction("1e-3") == pytest.approx(1e-3)


@pytest.mark.parametrize("flags,word", [
    (["--lr", "nan"], "--lr"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}/no-data-here"], "no-data-here"),
])
def test_bad_invocation_as_a_subprocess(flags, word, tmp_path, folder_cache):
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "robustdrop", "track", "--runs-dir", str(runs),
                           *fill(flags, tmp=tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "ROBUSTDROP_CACHE": str(folder_cache)})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and word in proc.stderr and "Traceback" not in proc.stderr
    assert not runs.exists() and not (tmp_path / "no-data-here").exists()
