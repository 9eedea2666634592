"""Progress bars on a terminal only: a run redirected to a log keeps its summary lines, not the
bar's carriage-return updates (robustdrop._progress)."""

from __future__ import annotations

import io
import sys

from helpers_runs import small_config

from robustdrop._progress import progress_bar, tee_stdout
from robustdrop.api import track


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_draws_on_a_terminal_only_and_when_asked():
    for stream, enabled, drawn in ((Terminal(), True, True), (io.StringIO(), True, False), (Terminal(), False, False)):
        with progress_bar(total=50, file=stream, enabled=enabled, mininterval=0) as bar:
            for _ in range(50):
                bar.update(1)
        assert ("\r" in stream.getvalue()) is drawn, (type(stream).__name__, enabled)


def test_tee_stdout_prints_and_appends_to_the_log_without_bars(tmp_path, capsys):
    log = tmp_path / "command.log"
    for n in (1, 2):  # a later command appends
        with tee_stdout(log):
            print(f"command {n}")
            with progress_bar(total=3, file=sys.stdout, mininterval=0) as bar:
                bar.update(3)
        print("after")
    assert capsys.readouterr().out == "command 1\nafter\ncommand 2\nafter\n"
    assert log.read_text() == "command 1\ncommand 2\n"


def test_a_run_whose_output_is_not_a_terminal_logs_summaries_without_bars(synthetic_data, tmp_path, capsys,
                                                                         one_thread):
    """As `robustdrop track ... > log 2>&1`: no bar updates at all, the per-epoch lines stay
    (the final evaluation's bar and a sweep's bar are the same helper)."""
    track(small_config(epochs=2, final_eval=["fgsm"], final_eval_size=64), runs_dir=tmp_path, name="r",
          data=synthetic_data, progress=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err
    assert [line[:13] for line in captured.out.splitlines() if line.startswith("epoch ")] == ["epoch   1/2 |",
                                                                                             "epoch   2/2 |"]
