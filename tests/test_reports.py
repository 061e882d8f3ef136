"""Run reports and comparisons, on real runs: ``report: true`` and the ``report`` callback
write the plots and report.html at a run's end (finished or failed); ``oiafed report`` works on
a run still going; the page loads in a real headless Chromium with no console message and
every plot shown; ``oiafed compare`` prints the table and writes the overlay; bad input is
exit 2 naming the folder, with nothing written."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import oiafed
from oiafed import Callback, CallbackError
from oiafed.cli import main
from oiafed.exceptions import InputError, NotARunFolder
from oiafed.reporting import html, plots
from oiafed.reporting.report import PLOTS_DIR, REPORT_HTML, write_report
from oiafed.reporting.runs import RunRecord, read_run, summarize
from support import tiny_config

ROUNDS = 4
CONFIG = tiny_config(
    name="report",
    report=True,
    data={"type": "digits", "num_clients": 5,
          "partition": {"type": "dirichlet", "args": {"alpha": 0.5, "min_size": 10}}},
    trainer={"args": {"rounds": ROUNDS, "clients_per_round": 2}},
    callbacks=[{"type": "lr_scheduler",
                "args": {"scheduler_type": "step", "step_size": 2, "gamma": 0.5}}],
)
PLOTS = {"accuracy.png", "loss.png", "round_time.png", "lr.png", "client_sampling.png",
         "label_histogram.png"}
PERSONAL = "personal_accuracy.png"
PERSONAL_PLOTS = PLOTS - {"lr.png"} | {PERSONAL}  # no lr_scheduler: the lr does not change
PERSONAL_CONFIG = tiny_config(name="personal", report=True,
                              data={"type": "digits", "num_clients": 4, "local_test_fraction": 0.2},
                              trainer={"args": {"rounds": 2}})
CONSOLE_LINE = re.compile(r":CONSOLE[:(]")


def rows(file: Path) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines()]


def listing(folder: Path) -> dict[str, float]:
    """Every file under ``folder`` with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of ``CONFIG`` (``report: true``)."""
    run_dir = tmp_path_factory.mktemp("runs") / "finished"
    oiafed.run(CONFIG, run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def personal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with local test sets (personal metrics), ``report: true``."""
    run_dir = tmp_path_factory.mktemp("runs") / "personal"
    oiafed.run(PERSONAL_CONFIG, run_dir=run_dir)
    return run_dir


class Boom(Callback):
    """Raises at the end of round 2 (strict mode: the run fails)."""

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        if round_num == 2:
            raise RuntimeError("boom in round 2")


class ReportNow(Callback):
    """Writes the report of its own run at the end of round ``at``: of a run going on."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.record: RunRecord | None = None

    async def on_round_end(self, trainer, round_num, result, **kwargs):
        if round_num == self.at:
            write_report(trainer.run_dir)
            self.record = read_run(trainer.run_dir)
            self.page = (trainer.run_dir / REPORT_HTML).read_text()


@pytest.fixture(scope="session")
def chromium() -> str:
    """A Chromium to load pages in: installed from the Debian packages when missing and the
    tests run as root (as in CI), else the test is skipped saying why."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("no chromium on PATH (and not root with apt-get to install it): "
                    "apt-get install chromium to test report.html in a browser")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"apt-get install chromium failed:\n{done.stderr[-2000:]}"
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium, but it is not on PATH"
    return found


def load(browser: str, page: Path, profile: Path) -> tuple[str, list[str]]:
    """``(the DOM after the load event, the console messages)`` of ``page`` in headless
    Chromium (it logs each console message and uncaught error to stderr as a CONSOLE line)."""
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if CONSOLE_LINE.search(line)]


def test_report_true_writes_every_plot_and_the_page_with_them_inline(finished):
    written = {p.name for p in (finished / PLOTS_DIR).iterdir()}
    assert written == PLOTS
    page = (finished / REPORT_HTML).read_text()
    for name in PLOTS:
        png = (finished / PLOTS_DIR / name).read_bytes()
        assert imread(finished / PLOTS_DIR / name).shape[0] > 100  # a real picture
        assert base64.b64encode(png).decode() in page  # the same picture, inline
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched
    summary = json.loads((finished / "summary.json").read_text())
    assert f"<th>best round (accuracy)</th><td>{summary['best_round']}</td>" in page
    assert "stop reason: completed" in page
    assert "report: true" in page  # the resolved config


def test_read_run_matches_the_files_the_run_wrote(finished):
    record = read_run(finished)
    metrics = rows(finished / "metrics.jsonl")
    summary = json.loads((finished / "summary.json").read_text())
    assert record.rounds == metrics and record.rounds_completed == ROUNDS
    assert record.status == "completed" and record.stop_reason == "completed"
    assert record.best_round == summary["best_round"]
    assert record.wall_time == summary["wall_time"]
    counted: dict[str, int] = {}
    for row in rows(finished / "clients.jsonl"):
        counted[row["client_id"]] = counted.get(row["client_id"], 0) + 1
    assert record.times_sampled == counted
    assert sum(counted.values()) == ROUNDS * 2
    assert [row["lr"] for row in metrics] == [0.05, 0.05, 0.025, 0.025]


def test_summarize_best_final_and_rounds_to_target(finished):
    metrics = rows(finished / "metrics.jsonl")
    accuracy = [row["accuracy"] for row in metrics]
    target = sorted(accuracy)[1]  # reached, but not necessarily in round 1
    summary = summarize(read_run(finished), "accuracy", target)
    assert summary.best == max(accuracy) and summary.final == accuracy[-1]
    assert summary.best_round == accuracy.index(max(accuracy)) + 1
    assert summary.rounds_to_target == next(i for i, a in enumerate(accuracy, 1) if a >= target)
    loss = [row["loss"] for row in metrics]
    by_loss = summarize(read_run(finished), "loss", target=min(loss))
    assert not by_loss.higher_is_better and by_loss.best == min(loss)
    assert by_loss.rounds_to_target == loss.index(min(loss)) + 1
    assert summarize(read_run(finished), "accuracy", 2.0).rounds_to_target is None


def test_a_personal_run_reports_its_personal_accuracy_and_spread(personal):
    assert {p.name for p in (personal / PLOTS_DIR).iterdir()} == PERSONAL_PLOTS
    assert imread(personal / PLOTS_DIR / PERSONAL).shape[0] > 100
    page = (personal / REPORT_HTML).read_text()
    png = (personal / PLOTS_DIR / PERSONAL).read_bytes()
    assert f'<figure id="personal_accuracy"><img src="data:image/png;base64,' \
           f'{base64.b64encode(png).decode()}"' in page
    final = rows(personal / "metrics.jsonl")[-1]
    for name in ("personal_accuracy", "personal_accuracy_median", "personal_accuracy_p10",
                 "personal_accuracy_min"):
        assert f"<tr><th>{name}</th><td>{final[name]:.4f}</td>" in page


@pytest.mark.parametrize(("run", "shown"), [("finished", PLOTS), ("personal", PERSONAL_PLOTS)])
def test_report_loads_in_headless_chromium_with_every_plot_and_no_console_message(
        request, run, shown, chromium, tmp_path):
    run_dir = request.getfixturevalue(run)
    dom, console = load(chromium, run_dir / REPORT_HTML, tmp_path / "profile")
    assert console == []
    assert f'data-plots="loaded {len(shown)} of {len(shown)}"' in dom


def test_the_browser_check_can_fail(finished, chromium, tmp_path):
    """A page whose plot is not a PNG, and an error in a script, are seen."""
    record = read_run(finished)
    broken = tmp_path / "broken.html"
    broken.write_text(html.render(record, [(plots.report_plots(record)[0], b"not a png")])
                      .replace("</body>", "<script>undefinedFunction();</script></body>"))
    dom, console = load(chromium, broken, tmp_path / "profile")
    assert 'data-plots="loaded 0 of 1"' in dom and "1 plot(s) failed to load" in dom
    assert len(console) == 1 and "undefinedFunction" in console[0]


def test_a_failed_run_reports_what_it_did_and_why_it_failed(tmp_path):
    config = tiny_config(strict=True, callbacks=[{"type": "report"}])
    with pytest.raises(CallbackError, match="boom in round 2"):
        oiafed.run(config, run_dir=tmp_path / "failed", callbacks=[Boom()])
    record = read_run(tmp_path / "failed")
    assert record.status == "failed" and "boom in round 2" in (record.stop_reason or "")
    assert record.rounds_completed == 1  # round 2 failed in its callback
    page = (tmp_path / "failed" / REPORT_HTML).read_text()
    assert '<span class="status failed">failed</span>' in page
    assert "End of run.log" in page and "RuntimeError: boom in round 2" in page
    assert (tmp_path / "failed" / PLOTS_DIR / "accuracy.png").is_file()


def test_a_run_still_going_is_reported_without_disturbing_it(tmp_path):
    reporter = ReportNow(at=2)
    result = oiafed.run(tiny_config(), run_dir=tmp_path / "going", callbacks=[reporter])
    assert reporter.record is not None  # the report of round 2's end: round 1 recorded
    assert reporter.record.status == "in progress" and reporter.record.rounds_completed == 1
    assert "1 of 3 rounds so far" in reporter.page
    assert [row["round"] for row in rows(tmp_path / "going" / "metrics.jsonl")] == [1, 2, 3]
    assert result.rounds_completed == 3 and read_run(tmp_path / "going").status == "completed"


def test_a_half_written_last_line_is_skipped_a_bad_middle_line_is_an_error(finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "summary.json").unlink()
    with open(copy / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 5, "accur')  # a run writing its next line
    record = read_run(copy)
    assert record.rounds_completed == ROUNDS and record.status == "in progress"
    assert record.wall_time == pytest.approx(sum(r["round_time"] for r in record.rounds))
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(InputError, match=r"metrics\.jsonl line 2 is not JSON"):
        read_run(copy)


def test_cli_report_and_compare(finished, tmp_path, capsys):
    other = tmp_path / "other"
    oiafed.run(tiny_config(trainer={"args": {"rounds": 2}}), run_dir=other)
    assert main(["report", str(other), "-q"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {other / REPORT_HTML}"
    assert {p.name for p in (other / PLOTS_DIR).iterdir()} >= {"accuracy.png", "loss.png"}
    out = tmp_path / "both.png"
    target = 0.5
    assert main(["compare", str(finished), str(other), "--target", str(target),
                 "--output", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    for run_dir in (finished, other):
        accuracy = [row["accuracy"] for row in rows(run_dir / "metrics.jsonl")]
        reached = next((i for i, a in enumerate(accuracy, 1) if a >= target), "not reached")
        line = next(line for line in printed.splitlines() if str(run_dir) in line)
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        assert cells[3:7] == [f"{max(accuracy):.4f}", f"{accuracy[-1]:.4f}",
                              str(accuracy.index(max(accuracy)) + 1), str(reached)]
    assert imread(out).shape[0] > 100 and f"plot: {out}" in printed


def test_bad_input_is_exit_2_naming_the_folder_and_nothing_is_written(finished, tmp_path,
                                                                     capsys):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    before = listing(tmp_path)
    out = tmp_path / "out.png"
    assert main(["report", str(not_a_run)]) == 2
    assert f"{not_a_run} is not a run folder (no config.yaml)" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "missing is not a run folder (no such folder)" in capsys.readouterr().err
    assert main(["compare", str(finished), str(not_a_run), "--output", str(out)]) == 2
    assert f"{not_a_run} is not a run folder" in capsys.readouterr().err
    assert main(["compare", str(finished), "--metric", "acuracy", "--output", str(out)]) == 2
    assert "no round recorded the metric 'acuracy'" in capsys.readouterr().err
    assert main(["compare", str(finished), "--output", str(tmp_path / "nowhere" / "x.png")]) == 2
    assert "--output: the folder" in capsys.readouterr().err
    assert listing(tmp_path) == before
    with pytest.raises(NotARunFolder) as caught:
        read_run(not_a_run)
    assert caught.value.folder == str(not_a_run)


def test_plots_of_a_large_federation_are_capped():
    clients = {f"client_{i}": {"label_counts": [i, 1000 - i]} for i in range(1000)}
    record = RunRecord(path=Path("big"), config={}, config_text="", rounds=[],
                       times_sampled={f"client_{i}": 1 + i % 7 for i in range(1000)},
                       partition={"num_clients": 1000, "clients": clients})
    found = plots.label_counts(record)
    assert found is not None
    ids, table = found
    assert len(ids) == plots.MAX_HEATMAP_CLIENTS and ids[0] == "client_0"
    assert ids[-1] == "client_999" and np.array_equal(table[:, 0], [int(c[7:]) for c in ids])
    drawn = {plot.file: plots.png_bytes(plot.draw(record)) for plot in plots.report_plots(record)}
    assert set(drawn) == {"client_sampling.png", "label_histogram.png"}
    assert all(png.startswith(b"\x89PNG") for png in drawn.values())
