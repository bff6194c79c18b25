"""hgf reproduce shows its progress (per run and for the whole grid) and its report claims no
more than the runs show: the ordering is "reproduced" only beyond the seed noise."""

import io
import re

from hgf.cli import main
from hgf.reproduce import plots, runner
from hgf.reproduce.grid import ARMS, load_preset
from hgf.reproduce.report import commits_line, loss_note, ordering, shown_path
from hgf.train import metrics
from hgf.train.metrics import Progress, format_duration, progress_scope
from test_reproduce import _preset


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_grid_prints_progress_lines_without_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "PLAIN_EVERY_S", 0.0)  # a line per step instead of per ~10 s
    preset = _preset(tmp_path, arms=("fp16", "hgf"))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(preset), "--out", str(out), "--steps", "4"]) == 0
    cap = capsys.readouterr()
    # per run: steps, loss, tokens/s, the run's ETA and the whole grid's status, plain lines
    assert re.search(r"^run 1/2 fp16@4: step 1/4 loss \d+\.\d{4} [\d,]+ tok/s ETA \S+ "
                     r"\| runs 0/2 done, \S+ elapsed, ETA \S+$", cap.err, re.M), cap.err
    assert re.search(r"^run 2/2 hgf@4: step 4/4 loss .* ETA 0s \| runs 1/2 done", cap.err, re.M)
    assert "\r" not in cap.err  # no tqdm bar in a log
    # the grid: a line when each run starts and ends, with runs done, elapsed and ETA
    assert re.search(r"^run 1/2 fp16@4 -> .*fp16-4steps-seed0 \(runs 0/2 done, \S+ elapsed\)$",
                     cap.out, re.M), cap.out
    assert re.search(r"^run 1/2 fp16@4: ok in \d+ s; runs 1/2 done, \S+ elapsed, ETA \S+$",
                     cap.out, re.M), cap.out
    assert re.search(r"^data: tokenizer trained and stories tokenized in \S+, cached in ", cap.out,
                     re.M)  # once: the second run finds the cache
    assert cap.out.count("data: ") == 1
    assert re.search(r"^all 2 runs done \(2 run now, 0 done already\) in \S+$", cap.out, re.M)

    # the report of one seed per arm claims no ordering and says what the commits are
    report = (out / "report.md").read_text()
    assert "**reproduced**" not in report
    assert "Code version: the git commit of hgf's source tree recorded in each run's " \
           "`run_info.json`" in report
    assert "The curves below: the fixed evaluation subset" in report
    assert "![validation loss on the evaluation subset, 4 steps](val_loss_4.png)" in report


def test_progress_bar_on_a_terminal_names_the_run():
    tty = _Tty()
    with progress_scope("run 3/12 hgf@70", lambda done, left: f"runs 2/12 done, ETA {left}s"):
        bar = Progress(70, 0, enabled=False, stream=tty)  # a scope shows it whatever train.progress
        for _ in range(3):
            bar.update(5.12, 2000.0)
        bar.close()
    text = tty.getvalue()
    assert "run 3/12 hgf@70" in text and "3/70" in text and "loss 5.1200" in text
    assert "runs 2/12 done, ETA 67s" in text and "\r" in text


def test_progress_outside_a_scope_follows_train_progress(monkeypatch):
    monkeypatch.setattr(metrics, "PLAIN_EVERY_S", 0.0)
    quiet, log = io.StringIO(), io.StringIO()
    for stream, enabled in ((quiet, False), (log, True)):
        p = Progress(10, 4, enabled=enabled, stream=stream)  # resumed at step 4
        p.update(3.5, 1234.0)
        p.close()
    assert quiet.getvalue() == ""
    assert re.fullmatch(r"train: step 5/10 loss 3\.5000 1,234 tok/s ETA \S+\n", log.getvalue())


def test_durations_and_grid_eta(monkeypatch):
    assert [format_duration(s) for s in (0, 42.4, 245, 3720, float("nan"))] == \
        ["0s", "42s", "4m05s", "1h02m", "?"]

    class Spec:
        def __init__(self, steps, done=False):
            self.steps, self.done = steps, done

    now = [100.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: now[0])
    specs = [Spec(50, done=True), Spec(50), Spec(70)]
    clock = runner.Clock(specs)
    assert clock.status() == "runs 1/3 done, 0s elapsed"  # no ETA before a step is done
    clock.start(specs[1])
    now[0] += 10.0
    # 10 s for 20 of the run's 50 steps: 30 left + 70 of the next run at 2 steps/s
    assert clock.status(20, 30) == "runs 1/3 done, 10s elapsed, ETA 50s"
    now[0] += 15.0
    clock.end(50)
    assert clock.status() == "runs 2/3 done, 25s elapsed, ETA 35s"


def test_smoke_preset_runs_every_arm_and_regime_on_one_thread():
    preset = load_preset("smoke")
    assert preset.arms == list(ARMS) and preset.steps == [50, 70] and preset.seeds == 1
    from hgf.reproduce.grid import plan_grid

    specs = plan_grid(preset, __import__("pathlib").Path("o"))
    assert len(specs) == 2 * len(ARMS) and {s.cfg.train.threads for s in specs} == {1}
    assert shown_path(preset.path) == "configs/reproduce/smoke.toml"  # no machine path in reports


def _rows(fp, hgf, bitnet, n=1, std=0.0):
    return {a: {"n": n, "val_loss": v, "val_loss_std": std}
            for a, v in (("fp16", fp), ("hgf", hgf), ("bitnet", bitnet))}


def test_ordering_is_reproduced_only_beyond_the_seed_noise():
    one_seed = ordering(_rows(6.0611, 6.1244, 6.1270))  # the smoke report's 0.0026-nat gap
    assert "**not established**" in one_seed and "seed noise is unknown" in one_seed
    assert "bitnet − hgf = +0.0026" in one_seed
    clear = ordering(_rows(3.0, 3.3, 3.6, n=3, std=0.01))
    assert "**reproduced**" in clear and "2·SE 0.0163" in clear
    close = ordering(_rows(3.0, 3.3, 3.31, n=3, std=0.01))
    assert "**not established**" in close and "bitnet − hgf is within twice" in close
    wrong = ordering(_rows(3.0, 3.6, 3.58, n=3, std=0.05))
    assert "**not reproduced**" in wrong and "opposite order is not established either" in wrong
    assert "seed noise is unknown" in ordering(_rows(3.0, 3.6, 3.5))


def test_commit_line_and_loss_note_say_what_they_count():
    line = commits_line({"abc123+dirty": 10, "def456": 2})
    assert "git commit" in line and "run_info.json" in line and "`+dirty`" in line
    assert "2 code versions" in line and "`abc123+dirty` 10, `def456` 2" in line
    runs = [{"steps": 70, "full_tokens": 44992, "subset_tokens": 2048, "eval_every": 10}]
    assert loss_note(runs, 70) == [
        "Losses in the table: the full validation set (44,992 tokens) after the last step. The "
        "curves below: the fixed evaluation subset (2,048 tokens, every 10 steps), so their last "
        "point differs from the table."]


def test_every_arm_variant_and_gate_has_its_own_look():
    labels = [*ARMS, *(f"variant{i}" for i in range(25))]
    styles = plots.label_styles(labels)
    assert len(set(map(str, styles.values()))) == len(labels)
    arms = [plots.ARM_STYLES[a] for a in ARMS]
    assert len({c for c, _ in arms}) == len({str(s) for _, s in arms}) == len(ARMS)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for n_layers in (2, 6, 20):  # debug (14 gates), paper, beyond the line styles
        names = [f"layers.{i}.{'attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in range(n_layers)
                 for p in projections]
        assert len(set(map(str, plots.gate_styles(names).values()))) == len(names)


def test_val_plot_draws_subset_lines_and_full_validation_markers(tmp_path):
    steps = 70
    run = {"arm": "hgf", "variant": None, "steps": steps, "seed_index": 0, "diverged": False,
           "val_curve": [(10, 7.0), (steps, 6.0)], "full_validation": True, "val_loss": 6.02,
           "full_tokens": 44992, "subset_tokens": 2048, "eval_every": 10}
    (path,) = plots.plot_val_curves([run, {**run, "arm": "bitnet"}], tmp_path)
    assert path.name == f"val_loss_{steps}.png" and path.stat().st_size > 0
