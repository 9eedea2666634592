"""Where referees come from: the shipped ``builtin:quick`` (it matches its provenance, and the check
can fail), ``--reference auto`` (trains once, then reuses; a corrupt or mismatched cache entry is a
one-line error naming the file), the quick preset's default and ``--reference none``, and the
evaluation precision (fp32 by default, in the run's config)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustdrop.api import track
from robustdrop.data import CIFAR10_JPEG_SHA256, make_synthetic
from robustdrop.diagnostics import (
    ReferenceStrengthDiagnostic,
    build_hooks,
    build_reference,
    builtin_names,
    find_reference,
    load_builtin,
    referee_config,
    verify_builtin,
)
from robustdrop.diagnostics import referees as referees_module
from robustdrop.diagnostics.referees import AUTO_MARKER, auto_key, auto_referee, write_builtin
from robustdrop.engine import Trainer, autocast_for, make_config
from robustdrop.errors import RobustdropError
from robustdrop.models import create_model
from robustdrop.store import RunStore

EPS = 8 / 255


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(n_train=192, n_test=64, num_classes=10, size=16, channels=3, seed=0)


def tiny_config(**over):
    values = dict(model="cnn1", width=2, epochs=2, batch_size=64, optimizer="adam", lr=0.003, epsilon=EPS,
                  probe_size=32, val_size=0, test_every=0, eval_pgd_steps=2, eval_pgd_step_size=EPS / 2,
                  eval_batch_size=64, device="cpu", seed=0, threads=1, diagnostics=["none"])
    values.update(over)
    return make_config(**values)


# ---------------------------------------------------------------------------------------------
# the shipped referee
# ---------------------------------------------------------------------------------------------
def test_quick_referee_is_shipped_and_matches_its_provenance():
    assert "quick" in builtin_names()
    state, provenance = verify_builtin("quick")  # sha256 of the file, its format and its config
    config = provenance["config"]
    assert (config["dataset"], config["method"], config["seed"]) == ("cifar10-jpeg", "pgd", 0)
    assert config["epsilon"] == pytest.approx(10 / 255)
    assert provenance["data"]["archive_sha256"] == CIFAR10_JPEG_SHA256
    assert provenance["command"] == "python analyses/make_reference.py --preset quick"
    for what in ("test_none", "test_pgd"):
        acc = provenance["accuracy"][what]
        assert 0 < acc["value"] < 1 and acc["n"] == 10000 and acc["split"] == "test"
    path = Path(referees_module.BUILTIN_DIR / "quick.pt")
    assert path.stat().st_size < 400_000  # a few hundred KB at most
    # The weights are a model of the recorded config, loaded without executing code.
    model = build_reference(load_builtin("quick"), num_classes=10, image_shape=(3, 32, 32))
    expected = create_model(config["model"], num_classes=10, in_channels=3, image_size=32, width=config["width"])
    assert set(model.state_dict()) == set(expected.state_dict())
    assert all(torch.equal(model.state_dict()[k].cpu(), v) for k, v in state["model"].items())


@pytest.mark.slow
def test_quick_referee_accuracy_matches_its_provenance(cifar10_jpeg):
    """Its clean accuracy on the full test set is the one recorded (the same computation as the
    training run's final evaluation, up to float summation order)."""
    _, provenance = verify_builtin("quick")
    model = build_reference(load_builtin("quick"), num_classes=10, image_shape=(3, 32, 32))
    correct = 0
    with torch.no_grad():
        for i in range(0, len(cifar10_jpeg.test_y), 1000):
            x = cifar10_jpeg.test_x[i:i + 1000].float() / 255
            correct += int((model(x).argmax(1) == cifar10_jpeg.test_y[i:i + 1000]).sum())
    assert correct / len(cifar10_jpeg.test_y) == pytest.approx(provenance["accuracy"]["test_none"]["value"], abs=2e-3)


def _tiny_shipped(tmp_path: Path) -> Path:
    model = create_model("cnn1", num_classes=10, in_channels=3, image_size=16, width=2)
    config = tiny_config(method="pgd").to_dict()
    write_builtin("tiny", model.state_dict(), config, {"seed": 0, "command": "test"}, tmp_path)
    return tmp_path


def test_shipped_referee_check_fails_on_a_changed_file_or_config(tmp_path):
    directory = _tiny_shipped(tmp_path)
    state, provenance = verify_builtin("tiny", directory)
    assert provenance["file"] == "tiny.pt" and provenance["config"] == state["config"]
    # one byte of the weights changed: SHA-256 mismatch, named
    weights = directory / "tiny.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(RobustdropError, match=r"tiny\.pt does not match its provenance tiny\.json"):
        verify_builtin("tiny", directory)
    weights.write_bytes(good)
    # the provenance records another config than the file carries
    record = json.loads((directory / "tiny.json").read_text())
    record["config"]["epsilon"] = 16 / 255
    (directory / "tiny.json").write_text(json.dumps(record))
    with pytest.raises(RobustdropError, match="another config than its provenance"):
        verify_builtin("tiny", directory)
    with pytest.raises(RobustdropError, match="no shipped referee builtin:nosuch"):
        find_reference("builtin:nosuch")


def test_the_shipped_quick_referee_check_fails_on_a_copy_with_one_byte_changed(tmp_path):
    for name in ("quick.pt", "quick.json"):
        shutil.copy(referees_module.BUILTIN_DIR / name, tmp_path / name)
    verify_builtin("quick", tmp_path)
    data = bytearray((tmp_path / "quick.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "quick.pt").write_bytes(bytes(data))
    with pytest.raises(RobustdropError, match="SHA-256"):
        verify_builtin("quick", tmp_path)


# ---------------------------------------------------------------------------------------------
# the quick preset uses it; --reference none / --diagnostics none turn it off
# ---------------------------------------------------------------------------------------------
def test_quick_preset_uses_the_shipped_referee_by_default():
    assert make_config("quick").reference == "builtin:quick"
    assert make_config("quick", reference="none").reference is None
    assert make_config("quick", diagnostics=["none"]).reference is None  # the preset's referee gives way
    assert make_config("quick", reference="auto").reference == "auto"
    with pytest.raises(RobustdropError, match="drop one of them"):  # an explicit one does not
        build_hooks(make_config("quick", diagnostics=["none"], reference="builtin:quick"))
    hooks = build_hooks(make_config("quick"))
    ref = next(h for h in hooks if isinstance(h, ReferenceStrengthDiagnostic))
    assert str(ref.source.path) == "builtin:quick" and ref.source.config["method"] == "pgd"
    assert ref.source.sha256 == verify_builtin("quick")[1]["sha256"]  # logged in the run's "reference" event
    assert "strength-ref" not in [h.name for h in build_hooks(make_config("quick", reference="none"))]


# ---------------------------------------------------------------------------------------------
# --reference auto
# ---------------------------------------------------------------------------------------------
class CountingTrainer(Trainer):
    fits = 0

    def fit(self):
        type(self).fits += 1
        return super().fit()


def test_auto_referee_trains_once_then_reuses(tmp_path, tiny_data, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTDROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(referees_module, "Trainer", CountingTrainer)
    CountingTrainer.fits = 0
    config = tiny_config(reference="auto", diagnostics=["strength-ref"])
    first = track(config, runs_dir=tmp_path / "runs", name="a", progress=False, data=tiny_data)
    assert CountingTrainer.fits == 1
    assert "training one" in capsys.readouterr().out
    second = track(config, runs_dir=tmp_path / "runs", name="b", progress=False, data=tiny_data)
    assert CountingTrainer.fits == 1  # reused, not retrained
    assert "reusing" in capsys.readouterr().out
    cached = Path(first.events("reference")[0]["path"])
    assert cached == Path(second.events("reference")[0]["path"])
    assert cached.parent == tmp_path / "cache" / "referees" and (cached / AUTO_MARKER).is_file()
    # the referee: PGD-5, the same data, model and ε, trained for the run's epochs
    ref_cfg = RunStore.open(cached).read_json(RunStore.CONFIG)
    assert (ref_cfg["method"], ref_cfg["pgd_steps"], ref_cfg["model"], ref_cfg["width"]) == ("pgd", 5, "cnn1", 2)
    assert ref_cfg["epsilon"] == EPS and ref_cfg["alpha"] == pytest.approx(EPS / 2) and ref_cfg["epochs"] == 2
    assert json.loads(first.path.joinpath("config.json").read_text())["reference"] == "auto"
    rows = second.metrics()
    assert set(rows[rows["source"] == "strength-ref"]["attack"]) >= {"fgsm", "noise-sign"}
    # another ε is another referee
    CountingTrainer.fits = 0
    auto_referee(tiny_config(epsilon=4 / 255), tiny_data, progress=False)
    assert CountingTrainer.fits == 1


def test_auto_key_covers_what_determines_the_referee(tiny_data):
    base = auto_key(referee_config(tiny_config()), tiny_data)[0]
    assert auto_key(referee_config(tiny_config(threads=2, probe_size=16, eval_pgd_steps=7)), tiny_data)[0] == base
    for over in (dict(epsilon=4 / 255), dict(width=3), dict(model="smallcnn"), dict(seed=1), dict(lr=0.01),
                 dict(epochs=3), dict(model="wideresnet", depth=10)):
        assert auto_key(referee_config(tiny_config(**over)), tiny_data)[0] != base, over
    other = make_synthetic(n_train=192, n_test=64, num_classes=10, size=16, channels=3, seed=1)
    assert auto_key(referee_config(tiny_config()), other)[0] != base
    long = referee_config(tiny_config(epochs=200))
    assert long.epochs == 30 and long.method == "pgd" and long.diagnostics == ["none"] and long.reference is None


def test_auto_referee_corrupt_or_mismatched_cache_is_a_one_line_error(tmp_path, tiny_data):
    config = tiny_config()
    run_dir = auto_referee(config, tiny_data, cache_dir=tmp_path, progress=False)
    marker = run_dir / AUTO_MARKER
    checkpoint = run_dir / "checkpoints" / "last.pt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[:100])
    with pytest.raises(RobustdropError, match=f"cached referee {checkpoint} is missing or corrupt") as err:
        auto_referee(config, tiny_data, cache_dir=tmp_path, progress=False)
    assert "\n" not in str(err.value) and str(run_dir) in str(err.value)
    checkpoint.write_bytes(good)
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "key": "0" * 64}))
    with pytest.raises(RobustdropError, match=f"cached referee {marker} was made for another setting"):
        auto_referee(config, tiny_data, cache_dir=tmp_path, progress=False)
    marker.write_text("{not json")
    with pytest.raises(RobustdropError, match=f"cached referee marker {marker} is unreadable"):
        auto_referee(config, tiny_data, cache_dir=tmp_path, progress=False)
    marker.write_text(json.dumps(record))
    assert auto_referee(config, tiny_data, cache_dir=tmp_path, progress=False) == run_dir


def test_strength_ref_measures_the_referee_constants_on_their_own_cadence(tmp_path, tiny_data):
    ref = auto_referee(tiny_config(), tiny_data, cache_dir=tmp_path, progress=False)
    store = track(tiny_config(epochs=4, reference=str(ref), diagnostics=["strength-ref:noise_every=3,pgd_every=0"]),
                  runs_dir=tmp_path / "runs", name="r", progress=False, data=tiny_data)
    rows = store.metrics()
    rows = rows[(rows["source"] == "strength-ref") & (rows["metric"] == "ref_acc")]
    by_epoch = {e: set(g["attack"]) for e, g in rows.groupby("epoch")}
    constants = {"none", "noise-sign", "noise-uniform"}
    assert by_epoch[1] == {"fgsm"} | constants  # first epoch
    assert by_epoch[2] == {"fgsm"}  # FGSM δ of the current model: every epoch
    assert by_epoch[3] == {"fgsm"} | constants and by_epoch[4] == {"fgsm"} | constants  # every 3rd, and the last


# ---------------------------------------------------------------------------------------------
# evaluation precision
# ---------------------------------------------------------------------------------------------
def test_evaluation_runs_in_fp32_by_default_and_says_so(tmp_path, tiny_data):
    assert make_config().eval_precision == "fp32" and make_config().amp is True
    store = track(tiny_config(epochs=1), runs_dir=tmp_path, name="p", progress=False, data=tiny_data)
    assert json.loads((store.path / "config.json").read_text())["eval_precision"] == "fp32"
    assert json.loads((store.path / "manifest.json").read_text())["eval_bf16"] is False
    with pytest.raises(RobustdropError, match="--eval-precision must be one of fp32, bf16"):
        make_config(eval_precision="fp16")


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_eval_autocast_is_bf16_only_when_asked_and_on_cuda(tmp_path, tiny_data):
    cuda = torch.device("cuda")
    assert autocast_for(cuda, False) is contextlib.nullcontext  # fp32 evaluation on a GPU
    ctx = autocast_for(cuda, True)()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert autocast_for(torch.device("cpu"), True) is contextlib.nullcontext
    for precision in ("fp32", "bf16"):  # what hooks and the evaluation get on this (CPU) run
        trainer = Trainer(tiny_config(eval_precision=precision), RunStore.create(tmp_path, precision), [],
                          progress=False, data=tiny_data)
        trainer.prepare()
        assert trainer.run.autocast_factory is contextlib.nullcontext


def test_cuda_run_keeps_training_bf16_and_evaluation_fp32(monkeypatch, tmp_path, tiny_data):
    """The plumbing on a pretend CUDA device: training autocast follows --amp, the evaluation's and
    the hooks' follow --eval-precision."""
    seen = []
    record = lambda device, on: seen.append(on) or contextlib.nullcontext  # noqa: E731
    monkeypatch.setattr("robustdrop.engine.trainer.autocast_for", record)  # the training steps
    monkeypatch.setattr("robustdrop.engine.observer.autocast_for", record)  # the context hooks and evaluation see
    trainer = Trainer(tiny_config(amp=True), RunStore.create(tmp_path, "c"), [], progress=False, data=tiny_data)
    trainer.prepare()
    assert seen == [True, False]  # training: amp; evaluation and diagnostics: eval_precision == bf16
    seen.clear()
    trainer = Trainer(tiny_config(amp=True, eval_precision="bf16"), RunStore.create(tmp_path, "d"), [],
                      progress=False, data=tiny_data)
    trainer.prepare()
    assert seen == [True, True]


# ---------------------------------------------------------------------------------------------
# threads: the CLI sets OMP_WAIT_POLICY before torch is imported
# ---------------------------------------------------------------------------------------------
CHECK_ORDER = """
import os, sys
class Guard:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and os.environ.get("OMP_WAIT_POLICY") is None:
            raise SystemExit("torch imported before OMP_WAIT_POLICY was set")
        return None
sys.meta_path.insert(0, Guard())
import robustdrop.cli
print(os.environ["OMP_WAIT_POLICY"], "torch" in sys.modules)
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_sets_a_passive_omp_wait_policy_before_torch_unless_given(given, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", CHECK_ORDER], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.split() == [expected, "True"]


def test_a_run_from_before_eval_precision_still_resumes(tmp_path, tiny_data):
    """config.json and the checkpoint of an older run lack the new field: it takes its default."""
    from robustdrop.api import resume

    store = track(tiny_config(epochs=1), runs_dir=tmp_path, name="old", progress=False, data=tiny_data)
    config = json.loads((store.path / "config.json").read_text())
    del config["eval_precision"]
    (store.path / "config.json").write_text(json.dumps(config))
    last = store.path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["config"]["eval_precision"]
    torch.save(state, last)
    resume(store.path, progress=False, data=tiny_data)  # already finished: loads and compares, then stops
    state["config"]["lr"] = 0.1  # a real difference is still refused
    torch.save(state, last)
    with pytest.raises(RobustdropError, match=r"differs in \['lr'\]"):
        resume(store.path, progress=False, data=tiny_data)
