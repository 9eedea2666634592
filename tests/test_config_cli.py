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


def test_cli_resume_missing_dir(capsys, tmp_path):
    code, out = _run_cli(["track", "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not a robustdrop run directory" in out.err


def test_cli_resume_refuses_config_flags(capsys, tmp_path):
    code, out = _run_cli(["track", "--resume", str(tmp_path), "--lr", "0.1"], capsys)
    assert code == 2 and "--lr" in out.err
