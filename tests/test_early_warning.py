"""The collapse detector's early rule (on synthetic metric tables and on a recorded quick run), its
actions through the hook, the ``switch`` action end to end (event, checkpoint, exact resume, a
rescued collapse), and FGSM with a step smaller than ε (the matched-strength control)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import test_diagnostics
import torch
from test_diagnostics import BinaryLinear, collapse_config, fake_run, mid_gray, rows
from test_engine import CrashAt, comparable, small_config

from robustdrop.api import resume, track
from robustdrop.attacks import FGSM
from robustdrop.diagnostics import (
    CollapseDetector,
    CollapseDiagnostic,
    CollapseRule,
    detect_collapse,
    first_epochs,
    signals_from_metrics,
)
from robustdrop.engine import Hook, make_config
from robustdrop.engine.config import switched_config
from robustdrop.errors import RobustdropError
from robustdrop.methods import create_method
from robustdrop.store import RunStore, metric_row

DATA = Path(__file__).parent / "data"
cifar16 = test_diagnostics.cifar16  # the module-scoped fixture: 16x16 CIFAR-10 where FGSM training collapses
# The a-priori rule before calibration: any early signal votes, fall 0.2. The tests of the voting
# mechanics (votes, the referee's and wong's signals, running maxima) use it; the default is now the
# calibrated align_fall alone with fall 0.15 (docs/collapse-prediction.md, "The early rule calibrated").
ANY = CollapseRule(signals="all", fall=0.2)


def table(pgd, fgsm=None, align=None, cos=None, ref=None) -> pd.DataFrame:
    """A recorded metrics table: probe accuracies, the strength rows and (``ref``: (fgsm, noise)
    pairs) the referee's rows, epochs 1, 2, ..."""
    out = []
    for e, p in enumerate(pgd, start=1):
        out.append(metric_row(e, 10 * e, "probe", "acc", p, attack="pgd", source="eval"))
        out.append(metric_row(e, 10 * e, "probe", "acc", (fgsm or pgd)[e - 1] + .02, attack="fgsm", source="eval"))
        for name, series in (("grad_alignment", align), ("cos_fgsm_pgd", cos)):
            if series is not None:
                out.append(metric_row(e, 10 * e, "probe", name, series[e - 1], attack="x", source="strength"))
        if ref is not None:
            out.append(metric_row(e, 10 * e, "probe", "ref_acc", ref[e - 1][0], attack="fgsm", source="strength-ref"))
            out.append(metric_row(e, 10 * e, "probe", "ref_acc", ref[e - 1][1], attack="noise-sign",
                                  source="strength-ref"))
    return pd.DataFrame(out)


# A collapse whose strength signals lead: alignment and cos(δ_FGSM, δ_PGD) fall from epoch 6 on,
# probe PGD accuracy halves at epoch 9 (FGSM accuracy climbs: catastrophic overfitting).
LEADING = dict(pgd=[.05, .15, .22, .26, .28, .29, .27, .20, .10, .03, .01, .0],
               fgsm=[.05, .15, .22, .26, .28, .29, .28, .30, .40, .55, .65, .70],
               align=[.97, .85, .86, .84, .85, .78, .62, .45, .30, .15, .10, .10],
               cos=[.90, .80, .79, .80, .78, .70, .55, .40, .25, .10, .06, .05])
# A control: accuracies rise and plateau, the signals wobble by a few hundredths.
FLAT = dict(pgd=[.05, .15, .22, .26, .28, .29, .30, .29, .31, .30, .31, .31],
            align=[.97, .78, .79, .76, .78, .77, .75, .78, .76, .77, .75, .76],
            cos=[.90, .80, .78, .80, .77, .79, .78, .76, .79, .78, .77, .78])


def test_early_rule_fires_on_leading_signals_before_the_pgd_drop():
    verdicts = detect_collapse(table(**LEADING), ANY)
    first = first_epochs(verdicts)
    assert first["pgd_drop"] == 9 and first["confirm"] == 9  # the confirmatory onset: at the drop
    assert first["align_fall"] == 7 and first["cos_fall"] == 7  # 0.62 ≤ 0.86 − 0.2; 0.55 ≤ 0.80 − 0.2
    assert first["early"] == 7 and first["misaligned"] == 8
    warned = [v for v in verdicts if v.warned]
    assert len(warned) == 1 and warned[0].warning == 7 and warned[0].values["early_votes"] == 2
    assert all(v.warning == 7 for v in verdicts[6:]) and all(v.warning is None for v in verdicts[:6])
    assert [v.score for v in verdicts][:7] == [0.0] * 7  # collapse_score counts the confirmatory signals only


def test_early_rule_silent_on_a_flat_control_and_on_accuracies_alone():
    verdicts = detect_collapse(table(**FLAT))
    assert first_epochs(verdicts)["early"] is None and not any(v.warned or v.fired for v in verdicts)
    assert all(v.flags["align_fall"] is False and v.flags["cos_fall"] is False for v in verdicts[1:])
    # without the strength diagnostic the early rule has nothing to read: no warning, the onset still comes
    first = first_epochs(detect_collapse(table(LEADING["pgd"], LEADING["fgsm"])))
    assert first["early"] is None and first["confirm"] == 9


def test_running_maxima_start_at_epoch_start_and_votes_count():
    # epoch 1's near-linear model (alignment 0.97) is not a baseline: with start=1 the flat control warns
    assert first_epochs(detect_collapse(table(**FLAT), replace(ANY, start=1)))["early"] == 4  # 0.76 ≤ 0.97 − 0.2
    assert [v.flags.get("align_fall") for v in detect_collapse(table(**FLAT), ANY)][:2] == [None, False]
    # votes=2: alignment alone falling does not warn; with cos falling too it does
    one = dict(LEADING, cos=FLAT["cos"])
    assert first_epochs(detect_collapse(table(**one), replace(ANY, votes=2)))["early"] == 8  # + misaligned
    assert first_epochs(detect_collapse(table(**one), replace(ANY, votes=3)))["early"] is None
    assert first_epochs(detect_collapse(table(**LEADING), replace(ANY, votes=2)))["early"] == 7
    # a smaller fall warns earlier; patience delays the detection, not the warning epoch
    assert first_epochs(detect_collapse(table(**LEADING), replace(ANY, fall=0.1)))["early"] == 6
    patient = detect_collapse(table(**LEADING), replace(ANY, patience=2))
    assert next(v for v in patient if v.warned).warning == 7 and first_epochs(patient)["early"] == 8


def test_referee_gap_signals():
    # the referee separates FGSM δ from noise by 8 points, then by 3 (ref_fall), then by 1 (ref_weak)
    ref = [(.70, .72), (.62, .70), (.61, .69), (.62, .70), (.66, .69), (.69, .70), (.71, .70)]
    first = first_epochs(detect_collapse(table([.1, .2, .25, .26, .25, .2, .05], ref=ref), ANY))
    assert first["ref_fall"] == 5 and first["ref_weak"] == 6 and first["early"] == 5
    # a referee that never separated them (best gap ≤ margin) leaves ref_fall out; ref_weak holds at once
    flat = [(.70, .71)] * 4
    verdicts = detect_collapse(table([.1, .2, .25, .26], ref=flat), ANY)
    assert "ref_fall" not in verdicts[-1].flags and first_epochs(verdicts)["ref_weak"] == 1


def test_signals_choose_which_early_signals_vote():
    # the flat referee holds ref_weak from epoch 1 (a false alarm at this scale); voting only
    # align_fall, the warning waits for the alignment to fall (epoch 7 in LEADING)
    flat_ref = [(.70, .71)] * len(LEADING["pgd"])
    noisy = table(**LEADING, ref=flat_ref)
    assert first_epochs(detect_collapse(noisy, ANY))["early"] == 1
    assert first_epochs(detect_collapse(noisy, CollapseRule(signals="align_fall")))["early"] == 7
    assert first_epochs(detect_collapse(noisy, CollapseRule(signals="align_fall+cos_fall", votes=2)))["early"] == 7
    assert first_epochs(detect_collapse(table(**FLAT, ref=flat_ref[:12]), CollapseRule(signals="align_fall")))["early"] is None
    with pytest.raises(RobustdropError, match="collapse:signals: 'pgd_drop' is not an early signal; use all or"):
        CollapseRule(signals="align_fall+pgd_drop")


def test_the_default_early_rule_is_the_calibrated_one():
    # analyses/lib/early_rule.py chose align_fall alone with fall 0.15 on the calibration seeds
    rule = CollapseRule()
    assert (rule.signals, rule.voters(), rule.fall) == ("align_fall", ("align_fall",), 0.15)
    # the flat referee's ref_weak holds from epoch 1 but does not vote: the default warns when the
    # alignment falls (0.62 ≤ 0.86 − 0.15 at epoch 7), as align_fall alone
    verdicts = detect_collapse(table(**LEADING, ref=[(.70, .71)] * len(LEADING["pgd"])))
    first = first_epochs(verdicts)
    assert first["ref_weak"] == 1 and first["align_fall"] == 7 and first["early"] == 7
    assert [v.values["early_votes"] for v in verdicts][5:8] == [0, 1, 1]  # ref_weak and cos_fall are not counted


def test_detector_state_round_trips_and_old_states_load():
    det = CollapseDetector()
    epochs = signals_from_metrics(table(**LEADING))
    for e in range(1, 7):
        det.update(e, epochs[e])
    buf = io.BytesIO()
    torch.save({"hooks": {"collapse": det.state_dict()}}, buf)  # as the trainer checkpoints it
    buf.seek(0)
    resumed = CollapseDetector()
    resumed.load_state_dict(torch.load(buf, weights_only=True)["hooks"]["collapse"])
    assert resumed.peaks == det.peaks
    a, b = det.update(7, epochs[7]), resumed.update(7, epochs[7])
    assert a.warned and b.warned and a.flags == b.flags
    # a state saved before the early rule existed (no peaks, no warning) still loads
    old = {k: v for k, v in CollapseDetector().state_dict().items()
           if k not in ("peaks", "early_streak", "early_streak_start", "warning")}
    legacy = CollapseDetector()
    legacy.load_state_dict(old)
    assert legacy.peaks == {} and legacy.warning is None


def test_early_rule_on_the_recorded_quick_run():
    """The quick preset's seed-0 FGSM run (tests/data/README.md): probe PGD accuracy peaks at 0.197
    (epoch 8) and halves at epoch 15; with the a-priori rule (ANY) both trend signals warn at 14;
    the default (calibrated) rule warns at 14 too; the confirmatory rule at 17."""
    metrics = pd.read_csv(DATA / "fgsm-quick-seed0-metrics.csv")
    verdicts = detect_collapse(metrics, ANY)
    first = first_epochs(verdicts)
    assert first["pgd_drop"] == 15 and first["confirm"] == 17
    assert first["align_fall"] == 14 and first["cos_fall"] == 14 and first["early"] == 14
    assert first["misaligned"] == 17 and first["weak_fgsm"] == 20
    assert first["ref_weak"] is None and first["ref_fall"] is None  # no referee in that run
    before = [v for v in verdicts if v.epoch < 14]
    assert not any(v.values["early_votes"] for v in before)  # silent for 13 epochs of normal training
    # the default rule: align_fall alone, fall 0.15. cos(δ_FGSM, δ_PGD) is 0.15 below its running max
    # already at epoch 12, but it does not vote; the alignment falls at 14, the same warning as ANY's
    default = detect_collapse(metrics)
    first = first_epochs(default)
    assert first["align_fall"] == 14 and first["cos_fall"] == 12 and first["early"] == 14 and first["confirm"] == 17
    assert [v.epoch for v in default if v.warned] == [14]
    assert [v.values["early_votes"] for v in default if v.epoch in (12, 13, 14)] == [0, 0, 1]


# ---------------------------------------------------------------------------------------------
# the hook's actions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["warn", "stop", "rollback", "switch"])
def test_early_mode_acts_at_the_warning(tmp_path, action, capsys):
    images, labels = mid_gray()
    extra = {"switch_to": "pgd:pgd_steps=2"} if action == "switch" else {}
    run = fake_run(tmp_path, BinaryLinear(), images, labels, epochs=20, on_collapse=action, **extra)
    hook = CollapseDiagnostic(mode="early")
    for e in range(1, 10):
        run.epoch = e
        run.metrics = {"probe/acc/pgd": LEADING["pgd"][e - 1], "probe/acc/fgsm": LEADING["fgsm"][e - 1],
                       "strength/grad_alignment": LEADING["align"][e - 1],
                       "strength/cos_fgsm_pgd": LEADING["cos"][e - 1]}
        hook.on_epoch_end(run, e)
        if e == 7:
            assert run.metrics["collapse/warning"] == 7.0
            requested = (run.stop_request, run.switch_request)
    (warning,) = run.store.events("collapse_warning")
    (onset,) = run.store.events("collapse_onset")
    assert warning["epoch"] == 7 and warning["action"] == action and warning["mode"] == "early"
    assert warning["signals"]["align_fall"] and warning["signals"]["cos_fall"]
    assert onset["epoch"] == 9 and onset["action"] == "none"  # the warning acted already
    stop, switch = requested
    assert (stop is not None) == (action in ("stop", "rollback")) and (switch is not None) == (action == "switch")
    if action == "rollback":
        assert stop[1] == 6  # keep the checkpoint of the epoch before the warning
    if action == "stop":
        assert stop[1] is None and "early warning of a collapse at epoch 7" in stop[0]
    if action == "switch":
        assert switch[1] == "pgd:pgd_steps=2" and "early warning" in switch[0]
    out = capsys.readouterr().out
    assert ("warning: early warning of a collapse at epoch 7" in out) == (action == "warn")
    assert "note: collapse detected: onset at epoch 9" in out and "the early warning was at epoch 7" in out


def test_confirm_mode_records_the_warning_and_acts_at_the_onset(tmp_path):
    images, labels = mid_gray()
    run = fake_run(tmp_path, BinaryLinear(), images, labels, epochs=20, on_collapse="stop")
    hook = CollapseDiagnostic()
    for e in range(1, 10):
        run.epoch = e
        run.metrics = {"probe/acc/pgd": LEADING["pgd"][e - 1], "probe/acc/fgsm": LEADING["fgsm"][e - 1],
                       "strength/grad_alignment": LEADING["align"][e - 1]}
        hook.on_epoch_end(run, e)
        assert (run.stop_request is not None) == (e >= 9)
    assert run.store.events("collapse_warning")[0]["action"] == "none"
    assert run.store.events("collapse_onset")[0]["action"] == "stop"


def test_early_mode_acts_at_an_onset_that_came_without_a_warning(tmp_path):
    images, labels = mid_gray()
    run = fake_run(tmp_path, BinaryLinear(), images, labels, epochs=20, on_collapse="stop")
    hook = CollapseDiagnostic(mode="early")
    for e in range(1, 10):  # accuracies only: the early rule has nothing to read
        run.epoch = e
        run.metrics = {"probe/acc/pgd": LEADING["pgd"][e - 1], "probe/acc/fgsm": LEADING["fgsm"][e - 1]}
        hook.on_epoch_end(run, e)
    assert run.store.events("collapse_warning") == []
    assert run.store.events("collapse_onset")[0]["action"] == "stop" and run.stop_request is not None


def test_bad_mode_and_switch_specs_are_one_line_errors():
    with pytest.raises(RobustdropError, match="collapse:mode must be one of confirm, early"):
        CollapseDiagnostic(mode="soon")
    with pytest.raises(RobustdropError, match="go together"):
        small_config(on_collapse="switch")
    with pytest.raises(RobustdropError, match="go together"):
        small_config(switch_to="rs-fgsm")
    with pytest.raises(RobustdropError, match="--switch-to nope: unknown method 'nope'"):
        small_config(on_collapse="switch", switch_to="nope")
    with pytest.raises(RobustdropError, match="bad --switch-to item 'steps=2'.*one of alpha, pgd_steps, nfgsm_noise"):
        small_config(on_collapse="switch", switch_to="pgd:steps=2")
    with pytest.raises(RobustdropError, match="--pgd-steps must be at least 1"):
        small_config(on_collapse="switch", switch_to="pgd:pgd_steps=0")
    cfg = small_config(method="fgsm", alpha=2 / 255, on_collapse="switch", switch_to="pgd:pgd-steps=2,alpha=3/255")
    new = switched_config(cfg, cfg.switch_to)
    assert (new.method, new.pgd_steps, new.alpha, new.epsilon) == ("pgd", 2, pytest.approx(3 / 255), cfg.epsilon)
    assert switched_config(cfg, "rs-fgsm").alpha is None  # the fgsm run's α does not carry over
    assert switched_config(cfg, "gradalign:gradalign_lambda=0.5").gradalign_lambda == 0.5


# ---------------------------------------------------------------------------------------------
# the switch action in training
# ---------------------------------------------------------------------------------------------
class FeedAlignment(Hook):
    """Publishes a falling gradient alignment (before the detector): the early rule warns at epoch 2."""

    name = "feed-alignment"
    ALIGN = [.9, .6, .55]

    def __init__(self):
        super().__init__(every_n_epochs=1)

    def on_epoch_end(self, run, epoch):
        run.metrics["strength/grad_alignment"] = self.ALIGN[epoch - 1]


def switching_hooks():
    return [FeedAlignment(), CollapseDiagnostic(mode="early", start=1)]


def test_switch_continues_with_the_new_method_and_resumes_exactly(synthetic_data, tmp_path):
    cfg = small_config(epochs=3, method="fgsm", on_collapse="switch", switch_to="pgd:pgd_steps=2")
    straight = track(cfg, runs_dir=tmp_path, name="straight", data=synthetic_data, progress=False,
                     hooks=switching_hooks())
    (event,) = straight.events("method_switch")
    assert (event["epoch"], event["to"], event["method"], event["previous"]) == (2, "pgd:pgd_steps=2", "pgd", "fgsm")
    assert event["spec"]["steps"] == 2 and "early warning" in event["reason"]
    m = straight.metrics()
    train = m[(m.split == "train") & (m.metric == "loss")].set_index("epoch")
    assert list(train.attack) == ["fgsm", "fgsm", "pgd"] and list(train.steps) == [1, 1, 2]
    passes = m[m.metric == "passes_forward"].set_index("epoch")["value"]
    assert list(passes) == [2, 2, 3]
    assert straight.load_checkpoint("last")["switches"] == [{"epoch": 2, "to": "pgd:pgd_steps=2"}]

    steps_per_epoch = 448 // 64
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 3, after the switch
        track(cfg, runs_dir=tmp_path, name="killed", data=synthetic_data, progress=False,
              hooks=[*switching_hooks(), CrashAt(2 * steps_per_epoch + 2)])
    resumed = resume(tmp_path / "killed", data=synthetic_data, progress=False, hooks=switching_hooks())
    pd.testing.assert_frame_equal(comparable(straight), comparable(RunStore.open(resumed.path)))
    # The cost estimate is timing (each start of a process logs one), like the time rows.
    kinds = [e["kind"] for e in resumed.events() if e["kind"] != "estimate"]
    assert kinds.count("resume") == 1
    assert [k for k in kinds if k != "resume"] == [e["kind"] for e in straight.events() if e["kind"] != "estimate"]
    assert resumed.load_checkpoint("last")["switches"] == [{"epoch": 2, "to": "pgd:pgd_steps=2"}]


@pytest.mark.slow
def test_switch_to_pgd_at_the_early_warning_rescues_a_collapsing_run(tmp_path, cifar16):
    """The small real setting where FGSM training collapses (test_diagnostics' ``collapse_config``):
    acting on the early warning with PGD-2 keeps the probe PGD accuracy from collapsing."""
    # The subject is the switch, so the rule is the any-signal one (ANY): in this 6-epoch run it warns
    # at epoch 3 (cos_fall); the collapse comes at epoch 4 and the default rule (align_fall alone)
    # warns only then, with the onset, too late to rescue anything.
    cfg = collapse_config(diagnostics=["default", "collapse:mode=early,signals=all,fall=0.2"], on_collapse="switch",
                          switch_to="pgd:pgd_steps=2,alpha=8/255")
    store = track(cfg, runs_dir=tmp_path, name="rescued", progress=False, data=cifar16)
    (warning,) = store.events("collapse_warning")
    (switch,) = store.events("method_switch")
    assert switch["epoch"] == warning["detected_epoch"] < 6
    pgd = rows(store, "eval", "acc", split="probe", attack="pgd").set_index("epoch")["value"]
    assert store.events("collapse_onset") == [], pgd.to_dict()
    assert pgd[6] >= 0.5 * pgd.max(), pgd.to_dict()


# ---------------------------------------------------------------------------------------------
# FGSM with a smaller step (the matched-strength control)
# ---------------------------------------------------------------------------------------------
def test_fgsm_takes_a_step_at_most_epsilon_and_records_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x, y = torch.rand(16, 3, 8, 8) * 0.8 + 0.1, torch.randint(0, 4, (16,))
    full, small = FGSM(8 / 255)(model, x, y), FGSM(8 / 255, step_size=2 / 255)(model, x, y)
    assert torch.allclose(small.abs(), torch.full_like(small, 2 / 255))  # inside [0, 1]: |δ| = α
    assert torch.equal(small.sign(), full.sign())
    assert FGSM(8 / 255, step_size=2 / 255).spec().step_size == pytest.approx(2 / 255)
    assert FGSM(8 / 255, step_size=2 / 255).spec().describe() == "fgsm (ε=8/255, step 2/255)"
    with pytest.raises(ValueError, match="FGSM step must be in"):
        FGSM(8 / 255, step_size=9 / 255)
    method = create_method(make_config("quick", alpha=2.6 / 255))
    assert method.perturbation_spec().step_size == pytest.approx(2.6 / 255)
    assert create_method(make_config("quick")).perturbation_spec().step_size == pytest.approx(10 / 255)
    with pytest.raises(RobustdropError, match="--method fgsm steps at most ε"):
        create_method(make_config("quick", alpha=12 / 255))
