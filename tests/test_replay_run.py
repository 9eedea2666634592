"""robustdrop.diagnostics.replay.replay_run: diagnostics measured after training over a finished
run's per-epoch weights give the rows the attached diagnostics log (time aside), into the run's
own metrics; a finished replay is reused, an interrupted one starts over, a replay against a
retrained referee replaces the earlier one; bad input is one line before anything is written.

Tiny real trainings on synthetic data (cnn1 / smallcnn, one thread): seconds each."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers_runs import small_config

from robustdrop.api import track
from robustdrop.data import make_synthetic
from robustdrop.diagnostics.replay import REPLAYED_EVENT, is_replayed, replay_run
from robustdrop.errors import RobustdropError
from robustdrop.store import RunStore, metric_row

TIME = r"^time"


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_train=256, n_test=128, num_classes=10, size=16, channels=3, seed=0)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """A referee; ``live``: strength-ref and wong attached during training; ``later``: the same
    training without them, keeping every epoch's weights (``bare``: keeps none)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("replay")
    common = dict(model="smallcnn", epochs=3, val_size=32, seed=3)  # batch norm: train-mode BN must not leak
    track(small_config(**{**common, "method": "pgd", "pgd_steps": 2}), runs_dir=root, name="referee",
          progress=False, data=data)
    ref = str(root / "referee")
    track(small_config(**common, diagnostics=["strength-ref:n=32", "wong:n=32"], reference=ref), runs_dir=root,
          name="live", progress=False, data=data)
    track(small_config(**common, save_weights_every=1), runs_dir=root, name="later", progress=False, data=data)
    track(small_config(**{**common, "epochs": 2}), runs_dir=root, name="bare", progress=False, data=data)
    return root


def rows(path: Path, source: str) -> pd.DataFrame:
    m = RunStore.open(path).metrics()
    m = m[(m["source"] == source) & ~m["metric"].str.match(TIME)]
    return m.sort_values(["epoch", "split", "metric", "attack"]).reset_index(drop=True)


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_replayed_rows_are_the_attached_ones_and_a_second_call_reuses_them(runs, data, capsys):
    later = runs / "later"
    ref = dict(reference=runs / "referee", diagnostics=["strength-ref:n=32"])
    assert not is_replayed(later, **ref)
    training = RunStore.open(later).metrics()
    assert replay_run(later, **ref, data=data) == later  # the deferred referee measurement
    replay_run(later, diagnostics=["wong:n=32"], data=data)
    for source in ("strength-ref", "wong"):
        live = rows(runs / "live", source)
        assert len(live) > 0 and set(live["epoch"]) == {1, 2, 3}
        pd.testing.assert_frame_equal(rows(later, source), live)
    store = RunStore.open(later)
    pd.testing.assert_frame_equal(store.metrics().iloc[:len(training)], training)  # the training's rows first
    assert [e["diagnostics"] for e in store.events(REPLAYED_EVENT)] == [["strength-ref[n=32]"], ["wong[n=32]"]]
    assert store.events("reference")[0]["path"] == str((runs / "referee").resolve())
    # again: reused, nothing written
    before = digest(later)
    capsys.readouterr()
    replay_run(later, **ref, data=data)
    replay_run(later, diagnostics="wong:n=32", data=data)
    assert capsys.readouterr().out.count("reusing the replay") == 2
    assert digest(later) == before
    assert is_replayed(later, **ref) and is_replayed(later, diagnostics=["wong:n=32"])
    assert not is_replayed(later, diagnostics=["wong"]) and not is_replayed(later, reference=runs / "referee")


def test_an_interrupted_replay_starts_over_and_a_retrained_referee_replaces_the_old_rows(runs, data, tmp_path):
    torch.set_num_threads(1)
    cfg = small_config(model="smallcnn", epochs=3, val_size=32, seed=3, save_weights_every=1)
    track(cfg, runs_dir=tmp_path, name="run", progress=False, data=data)
    run = tmp_path / "run"
    track(small_config(method="pgd", pgd_steps=2, epochs=2, seed=1), runs_dir=tmp_path, name="ref", progress=False,
          data=data)
    # A replay killed while writing its rows, before its event: they are dropped, the replay made anew.
    store = RunStore.open(run)
    store.log_metrics([metric_row(1, 999, "probe", "ref_acc", 0.5, source="strength-ref")] * 3)
    store.flush()
    replay_run(run, reference=tmp_path / "ref", data=data)
    replay_run(run, diagnostics=["wong:n=32"], data=data)
    first = rows(run, "strength-ref")
    assert len(first) > 0 and not (first["step"] == 999).any()
    wong = rows(run, "wong")
    # The referee is trained again (another seed) at the same path: the replay is not reused, and
    # its rows replace the old ones; the wong replay stays.
    track(small_config(method="pgd", pgd_steps=2, epochs=2, seed=2), runs_dir=tmp_path, name="ref", overwrite=True,
          progress=False, data=data)
    assert not is_replayed(run, reference=tmp_path / "ref")
    replay_run(run, reference=tmp_path / "ref", data=data)
    second = rows(run, "strength-ref")
    assert len(second) == len(first) and not second["value"].equals(first["value"])
    pd.testing.assert_frame_equal(rows(run, "wong"), wong)
    store = RunStore.open(run)
    assert [e["sources"] for e in store.events(REPLAYED_EVENT)] == [["wong"], ["strength-ref"]]
    assert len(store.events("reference")) == 1
    last = store.events(REPLAYED_EVENT)[-1]
    assert last["rows"][1] == store.num_metric_rows and last["events"][1] == store.num_events - 1


def test_bad_replays_are_one_line_errors_before_anything_is_written(runs, data):
    bare, live = runs / "bare", runs / "live"
    cases = [
        (bare, dict(reference=runs / "referee"), r"lacks the weights of epochs \[1, 2\].*--save-weights-every 1"),
        (live, dict(diagnostics=["wong:n=32"]), "lacks the weights"),  # no weights kept either
        (runs / "later", dict(), "nothing to replay: give reference="),
        (runs / "later", dict(diagnostics=["collapse"]), "collapse diagnostic cannot be replayed"),
        (runs / "later", dict(diagnostics=["strength-ref"]), "needs a reference model"),
        (runs / "later", dict(reference=runs / "nosuch"), "reference .*nosuch does not exist"),
        (runs / "nosuch", dict(diagnostics=["wong"]), "not a robustdrop run directory"),
    ]
    for path, kwargs, message in cases:
        before = digest(path) if path.is_dir() else None
        with pytest.raises(RobustdropError, match=message) as info:
            replay_run(path, data=data, **kwargs)
        assert "\n" not in str(info.value)
        assert (digest(path) if path.is_dir() else None) == before


def test_an_unfinished_run_or_one_measured_during_training_is_refused(runs, data, tmp_path):
    torch.set_num_threads(1)
    track(small_config(epochs=2, save_weights_every=1, diagnostics=["wong:n=32"]), runs_dir=tmp_path, name="run",
          progress=False, data=data)
    run = tmp_path / "run"
    before = digest(run)
    with pytest.raises(RobustdropError, match="measured wong during training already"):
        replay_run(run, diagnostics=["wong:n=32"], data=data)
    assert digest(run) == before
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    torch.save({**state, "finished": False, "epoch": 1}, last)  # as a run stopped after epoch 1 leaves it
    before = digest(run)
    with pytest.raises(RobustdropError, match="has not finished training.*--resume"):
        replay_run(run, diagnostics=["strength"], data=data)
    assert digest(run) == before
