"""Config, presets, schedules and the CLI's promised errors."""

import subprocess
import sys

import pytest

from robustdrop.cli import main
from robustdrop.engine.config import PRESETS, make_config, parse_fraction
from robustdrop.errors import RobustdropError
from robustdrop.schedules import Schedule


def test_parse_fraction():
    assert parse_fraction("8/255") == pytest.approx(8 / 255)
    assert parse_fraction("0.5") == 0.5
    assert parse_fraction("12.5/255") == pytest.approx(12.5 / 255)  # as format_eps writes steps
    with pytest.raises(RobustdropError):
        parse_fraction("eight")


def test_preset_then_overrides():
    cfg = make_config("quick", epochs=3)
    assert cfg.model == PRESETS["quick"]["model"] and cfg.epochs == 3
    paper = make_config("paper")
    assert paper.model == "preactresnet18" and paper.epsilon == pytest.approx(8 / 255) and paper.lr == 0.2


@pytest.mark.parametrize("bad", [dict(epsilon=0.0), dict(epsilon=1.5), dict(method="foo"), dict(epochs=0)])
def test_bad_values_raise(bad):
    with pytest.raises(RobustdropError):
        make_config(**bad)


def test_unknown_preset():
    with pytest.raises(RobustdropError, match="quick"):
        make_config("nope")


def test_cyclic_schedule_shape():
    s = Schedule("cyclic", 0.2, 100, peak_at=0.5)
    assert s.value(0) == 0 and s.value(50) == pytest.approx(0.2) and s.value(100) == pytest.approx(0)
    assert s.value(25) == pytest.approx(0.1)


def test_repeating_cycle_and_piecewise():
    s = Schedule("cyclic-repeat", 1.0, 300, cycle_steps=30)
    assert s.value(15) == pytest.approx(1.0) and s.value(30) == pytest.approx(0.0) and s.value(45) == pytest.approx(1.0)
    p = Schedule("piecewise", 0.1, 100, milestones=(0.5, 0.75), gamma=0.1)
    assert p.value(10) == pytest.approx(0.1) and p.value(60) == pytest.approx(0.01) and p.value(80) == pytest.approx(0.001)


def test_schedule_state_roundtrip():
    s = Schedule("cyclic", 0.2, 100)
    for _ in range(7):
        s.step()
    t = Schedule("cyclic", 0.2, 100)
    t.load_state_dict(s.state_dict())
    assert t.current() == s.current()


@pytest.mark.parametrize("kind,peak_at,steps", [("cyclic", 0.5, 391 * 3), ("cyclic", 0.4, 101)])
def test_cycled_momentum_equals_torch_cyclic_lr(kind, peak_at, steps):
    """LR and momentum of every step equal PyTorch's CyclicLR(cycle_momentum=True), which the APART
    authors' train.py used for both optimizers (base 0.8, max 0.9 by default)."""
    import torch

    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    up = steps * peak_at
    ref = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0, max_lr=0.2, step_size_up=up, step_size_down=steps - up)
    ours = Schedule(kind, 0.2, steps, peak_at=peak_at, momentum=(0.8, 0.9))
    mine = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0, momentum=0.0)
    for _ in range(steps):
        lr = ours.apply(mine)
        assert lr == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        assert mine.param_groups[0]["momentum"] == pytest.approx(opt.param_groups[0]["momentum"], abs=1e-12)
        opt.step()
        ref.step()
        ours.step()


def test_momentum_cycling_needs_sgd_and_a_cycle():
    with pytest.raises(RobustdropError, match="--optimizer sgd"):
        make_config(cycle_momentum=True, optimizer="adam")
    with pytest.raises(RobustdropError, match="--schedule cyclic"):
        make_config(cycle_momentum=True, schedule="piecewise")
    with pytest.raises(RobustdropError, match="--base-momentum"):
        make_config(base_momentum=0.95, max_momentum=0.9)
    with pytest.raises(RobustdropError, match="cyclic"):
        Schedule("constant", 0.1, 10, momentum=(0.8, 0.9))
    assert make_config(cycle_momentum=True).cycle_momentum


def test_eval_epsilon():
    assert make_config().eval_epsilon is None
    assert make_config(eval_epsilon=8 / 255, epsilon=0.031).eval_epsilon == pytest.approx(8 / 255)
    with pytest.raises(RobustdropError, match="--eval-epsilon"):
        make_config(eval_epsilon=0.0)


def _run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_cli_bad_epsilon_one_line(capsys, tmp_path):
    code, out = _run_cli(["track", "--epsilon", "2", "--runs-dir", str(tmp_path)], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "--epsilon" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing created


def test_cli_unknown_method_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "robustdrop", "track", "--method", "sgd-magic"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--method" in proc.stderr


@pytest.mark.parametrize("flag,value", [("--model", "resnet9000"), ("--dataset", "imagenet-21k")])
def test_cli_unknown_model_or_dataset(capsys, tmp_path, flag, value):
    code, out = _run_cli(["track", flag, value, "--runs-dir", str(tmp_path), "--name", "x", "--no-progress",
                          "--epochs", "1"], capsys)
    assert code == 2
    assert value in out.err and len(out.err.strip().splitlines()) == 1


def test_model_and_method_names_come_from_the_registries(capsys):
    from robustdrop.cli import build_parser
    from robustdrop.methods import available_methods
    from robustdrop.models import available_models

    with pytest.raises(RobustdropError, match="unknown model 'resnet9000'; choose one of: " + ", ".join(available_models())):
        make_config(model="resnet9000")
    with pytest.raises(RobustdropError, match="unknown method 'sgd-magic'; choose one of: fgsm, rs-fgsm, pgd, apart, fgsm"):
        make_config(method="sgd-magic")
    assert available_methods()[:5] == ["fgsm", "rs-fgsm", "pgd", "apart", "fgsm+"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["track", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "model: " + " | ".join(available_models()) in help_text
    assert "{" + ",".join(available_methods()) + "}" in help_text


def test_cli_resume_missing_dir(capsys, tmp_path):
    code, out = _run_cli(["track", "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not a robustdrop run directory" in out.err


def test_cli_resume_refuses_config_flags(capsys, tmp_path):
    code, out = _run_cli(["track", "--resume", str(tmp_path), "--lr", "0.1"], capsys)
    assert code == 2 and "--lr" in out.err
