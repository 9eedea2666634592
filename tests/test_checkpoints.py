"""Checkpoint policy (robustdrop.store.checkpoints): what a run keeps, where a rollback goes, which
file is the run's result. Tiny fake states, no training."""

from __future__ import annotations

import pytest
import torch

from robustdrop.store import (
    KEEP_ROLLING,
    CheckpointSaver,
    RunStore,
    epoch_checkpoint_name,
    epoch_weights,
    load_checkpoint_file,
    parse_epoch,
    result_checkpoint,
)


def state(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}}


def run(tmp_path, epochs: int, **policy) -> CheckpointSaver:
    saver = CheckpointSaver(RunStore.create(tmp_path, "r"), **policy)
    for epoch in range(1, epochs + 1):
        saver.save(state(epoch), epoch)
    return saver


def files(saver: CheckpointSaver) -> list[str]:
    return sorted(p.name for p in saver.store.checkpoint_path("last").parent.iterdir())


def test_by_default_only_last_is_kept(tmp_path):
    saver = run(tmp_path, 5)
    assert files(saver) == ["last.pt"]
    assert saver.store.load_checkpoint("last")["epoch"] == 5


def test_every_n_epochs_are_kept_for_good(tmp_path):
    saver = run(tmp_path, 7, every=2)
    assert files(saver) == ["epoch_0002.pt", "epoch_0004.pt", "epoch_0006.pt", "last.pt"]
    assert saver.epochs() == [2, 4, 6]
    assert saver.store.load_checkpoint("epoch_0004")["epoch"] == 4


def test_rolling_window_keeps_the_recent_epochs(tmp_path):
    saver = run(tmp_path, 6, rolling=KEEP_ROLLING)
    assert saver.epochs() == [4, 5, 6]


def test_rolling_window_beside_permanent_epochs(tmp_path):
    # Epoch 7 leaves the window while epoch 10 (a permanent one) is saved: it must go all the same.
    saver = run(tmp_path, 12, every=5, rolling=3)
    assert saver.epochs() == [5, 10, 11, 12]


@pytest.mark.parametrize(("name", "epoch"), [
    ("epoch_0012.pt", 12), ("epoch_0003", 3), ("runs/x/checkpoints/epoch_0007.pt", 7), ("epoch_12345.pt", 12345),
    ("last.pt", None), ("result.pt", None), ("best_model.pt", None), ("epoch_x.pt", None),
    (".epoch_0003.pt.1a2b.tmp", None), ("epoch_0003.pt.bak", None),
])
def test_parse_epoch(name, epoch):
    assert parse_epoch(name) == epoch


def test_epoch_names_round_trip():
    assert epoch_checkpoint_name(7) == "epoch_0007"
    assert parse_epoch(epoch_checkpoint_name(123)) == 123


def test_epochs_ignore_other_files(tmp_path):
    saver = run(tmp_path, 2, every=1)
    folder = saver.store.checkpoint_path("last").parent
    (folder / "epoch_notes.pt").write_bytes(b"")
    (folder / ".epoch_0009.pt.ab12.tmp").write_bytes(b"")
    assert saver.epochs() == [1, 2]


def test_epoch_weights_prefer_the_small_weights_file_and_cover_both_kinds(tmp_path):
    # Full checkpoints of epochs 1-3 (--checkpoint-every), weights of 3-4 (--save-weights-every):
    # a replay or a best-epoch evaluation finds every epoch, reading the weights file where there is one.
    saver = CheckpointSaver(RunStore.create(tmp_path, "r"), every=1, weights_every=1)
    for epoch in range(1, 5):
        saver.save({**state(epoch), "step": 10 * epoch}, epoch)
    saver.store.checkpoint_path(epoch_checkpoint_name(4)).unlink()
    saver.store.checkpoint_path("weights_epoch_0001").unlink()
    saver.store.checkpoint_path("weights_epoch_0002").unlink()
    found = epoch_weights(saver.store.path)
    assert {e: p.name for e, p in found.items()} == {1: "epoch_0001.pt", 2: "epoch_0002.pt",
                                                     3: "weights_epoch_0003.pt", 4: "weights_epoch_0004.pt"}
    assert [load_checkpoint_file(p)["epoch"] for p in found.values()] == [1, 2, 3, 4]
    assert epoch_weights(tmp_path / "nothing") == {}


def test_rollback_takes_the_newest_epoch_at_or_before_the_target(tmp_path):
    saver = run(tmp_path, 12, every=5, rolling=3)  # epochs 5, 10, 11, 12 on disk
    assert saver.rollback_source(11, last_epoch=12).name == "epoch_0011.pt"
    assert saver.rollback_source(9, last_epoch=12).name == "epoch_0005.pt"
    assert saver.rollback_source(4, last_epoch=12) is None


def test_rollback_falls_back_to_last_only_when_it_holds_an_early_enough_epoch(tmp_path):
    saver = run(tmp_path, 1)  # only last.pt, holding epoch 1
    assert saver.rollback_source(1, last_epoch=1).name == "last.pt"
    assert saver.rollback_source(2, last_epoch=1).name == "last.pt"
    assert saver.rollback_source(0, last_epoch=1) is None
    empty = CheckpointSaver(RunStore.create(tmp_path, "empty"), rolling=3)
    assert empty.rollback_source(0, last_epoch=0) is None  # collapse in epoch 1: nothing to go back to


def test_keep_as_result_and_result_else_last(tmp_path):
    saver = run(tmp_path, 6, rolling=3)
    assert result_checkpoint(saver.store.path).name == "last.pt"
    result = saver.keep_as_result(saver.rollback_source(4, last_epoch=6))
    assert result == saver.store.checkpoint_path("result")
    assert load_checkpoint_file(result)["epoch"] == 4
    saver.save(state(7), 7)  # a newer last.pt does not change the result
    assert result_checkpoint(saver.store.path) == result


def test_result_checkpoint_of_a_run_without_checkpoints(tmp_path):
    assert result_checkpoint(RunStore.create(tmp_path, "fresh").path) is None


def test_bad_policy_is_refused(tmp_path):
    with pytest.raises(ValueError):
        CheckpointSaver(RunStore.create(tmp_path, "r"), every=-1)
