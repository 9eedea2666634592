"""robustdrop.store.export: a run's results without its checkpoints, and a folder packed as one
.tar.gz (what a lent GPU machine sends back, analyses/gpu_plan.py)."""

from __future__ import annotations

import tarfile

from robustdrop.store import EXPORT_FILES, export_run, pack_folder


def fake_run(path, files):
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(name)
    return path


def test_export_run_copies_the_results_and_extras_without_checkpoints_replacing_the_copy(tmp_path):
    run = fake_run(tmp_path / "run", [*EXPORT_FILES, "eval.json", "last.pt", "weights/epoch_0001.pt",
                                      "arrays/snapshots/epoch_0001.npz", "arrays/other.npz"])
    dest = tmp_path / "out" / "runs" / "run"
    fake_run(dest, ["stale.txt"])  # an earlier copy is replaced whole
    assert export_run(run, dest, extra=["eval.json", "arrays/snapshots", "absent.json"])
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert copied == sorted([*EXPORT_FILES, "eval.json", "arrays/snapshots/epoch_0001.npz"])
    assert (dest / "metrics.csv").read_text() == "metrics.csv"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["run"]  # no temporary copy left
    assert not export_run(tmp_path / "out", tmp_path / "x") and not (tmp_path / "x").exists()  # not a run


def test_pack_folder_packs_visible_files_under_one_name(tmp_path):
    folder = fake_run(tmp_path / "paper", ["fig.png", "runs/a/metrics.csv", ".hidden", "runs/.a.tmp/metrics.csv"])
    size = pack_folder(folder, tmp_path / "bundle" / "paper.tar.gz", arcname="paper")
    assert size == (tmp_path / "bundle" / "paper.tar.gz").stat().st_size
    with tarfile.open(tmp_path / "bundle" / "paper.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["paper/fig.png", "paper/runs/a/metrics.csv"]
        assert tar.extractfile("paper/runs/a/metrics.csv").read() == b"runs/a/metrics.csv"
