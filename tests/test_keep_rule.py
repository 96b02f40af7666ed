"""The keep rule against simulated runs with known effects and known noise, then driving the real loop (git,
results.tsv, runs/) with a stand-in training script whose val F1 is drawn from a known distribution."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import numpy as np
import pytest

from autobuster import loop, metrics
from autobuster.demo import scratch_copy
from test_loop import ROOT, cli, results

CLIPS = 160  # the tiny profile's val set: half real, half fake
LABELS = ["real"] * (CLIPS // 2) + ["fake"] * (CLIPS // 2)
FLIP = np.array(["fake"] * (CLIPS // 2) + ["real"] * (CLIPS // 2))


def simulated_run(rng, accuracy: float, seed_sd: float) -> tuple[float, list]:
    """One training run of a configuration whose expected accuracy is `accuracy`: the seed moves it by N(0, seed_sd),
    then every clip is right with that probability. Errors are symmetric and the classes balanced, so the expected
    F1 equals the accuracy; a run's F1 varies by about sqrt(seed_sd^2 + a (1 - a) / CLIPS) (the noise sigma)."""
    a = np.clip(accuracy + rng.normal(0, seed_sd), 0, 1)
    preds = np.where(rng.random(CLIPS) < a, LABELS, FLIP)
    return float(metrics.compute(LABELS, preds, [0.5] * CLIPS, LABELS)["f1"]), list(preds)


def experiment(rng, effect: float, seed_sd: float, earlier: int = 0, base: float = 0.85) -> tuple[str, int]:
    """A loop's decision on one edit, as `run` makes it: the baseline on two seeds, `earlier` other configurations
    that were run twice (a loop some hours in), the candidate on one seed, plus a confirming seed when the rule
    asks. (final status, candidate runs)."""
    best = [simulated_run(rng, base, seed_sd) for _ in range(2)]
    pool = [[simulated_run(rng, base, seed_sd)[0] for _ in range(2)] for _ in range(earlier)]
    cand = [simulated_run(rng, base + effect, seed_sd)]
    while True:
        c = loop.rule(LABELS, [p for _, p in best], [p for _, p in cand], pool + [[f for f, _ in best],
                                                                                [f for f, _ in cand]])
        status = loop.verdict(c)
        if status != "confirm":
            return status, len(cand)
        cand.append(simulated_run(rng, base + effect, seed_sd))


def todays_rule(rng, effect: float, seed_sd: float, base: float = 0.85) -> str:
    """The rule this one replaced: one run each, higher F1 and p_better >= 0.8 on the paired bootstrap."""
    (fa, pa), (fb, pb) = simulated_run(rng, base, seed_sd), simulated_run(rng, base + effect, seed_sd)
    return "keep" if fb > fa and metrics.paired_bootstrap(LABELS, [pa], [pb])["p_better"] >= loop.P_BETTER \
        else "discard"


def sigma(seed_sd: float, base: float = 0.85) -> float:
    return (seed_sd ** 2 + base * (1 - base) / CLIPS) ** 0.5


def rates(seed_sd: float, trials: int, earlier: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    two = 2 * sigma(seed_sd)
    zero = [experiment(rng, 0.0, seed_sd, earlier) for _ in range(trials)]
    real = [experiment(rng, two, seed_sd, earlier) for _ in range(trials)]
    return dict(sigma=sigma(seed_sd), zero_kept=np.mean([s == "keep" for s, _ in zero]),
                real_kept=np.mean([s == "keep" for s, _ in real]),
                confirmed=np.mean([n == 2 for _, n in zero + real]),
                today_zero_kept=np.mean([todays_rule(rng, 0.0, seed_sd) == "keep" for _ in range(trials)]),
                today_real_kept=np.mean([todays_rule(rng, two, seed_sd) == "keep" for _ in range(trials)]))


@pytest.mark.parametrize("seed_sd", [0.01, 0.06])
@pytest.mark.parametrize("earlier", [0, 4])
def test_real_gains_are_kept_and_zero_effects_rarely(seed_sd, earlier):
    """At P_BETTER 0.8 a calibrated one-sided rule keeps a zero-effect edit about one time in five at most; the
    rates over more trials and noise levels are in BENCHMARKS.md."""
    r = rates(seed_sd, trials=300, earlier=earlier)
    assert r["real_kept"] >= 0.7  # an improvement of two noise sigmas: kept most of the time
    assert r["zero_kept"] <= 0.3  # an edit that changes nothing: rarely (about 0.2 over many trials)
    assert r["zero_kept"] < r["today_zero_kept"] - 0.03  # and less often than by one run's bootstrap alone


# ---------------------------------------------------------------- the real loop, with a stand-in training script

STANDIN = """\"\"\"Stand-in for train_dapo.py: no model. Its val predictions get exactly ACCURACY[seed] right (seeds past the
list wrap around), the wrong clips drawn by the seed, so a test knows every run's F1 before it runs.\"\"\"
import json, os, time
from pathlib import Path
import numpy as np
from autobuster import dataset, metrics
from autobuster.profiles import active
ACCURACY = [0.86, 0.78]
SLEEP = 0.0
SETUP = active()
out = Path(os.environ["AUTOBUSTER_RUN_DIR"])
out.mkdir(parents=True, exist_ok=True)
rows, _ = dataset.eval_clips(SETUP, "val")
time.sleep(SLEEP)
wrong = np.random.default_rng(SETUP.seed).permutation(len(rows))[:round((1 - ACCURACY[SETUP.seed % len(ACCURACY)]) * len(rows))]
pred = rows.label.to_numpy(dtype=object)
pred[wrong] = np.where(pred[wrong] == "fake", "real", "fake")
pd = rows.assign(prediction=pred)[["id", "label", "prediction"]]
pd.to_json(out / "predictions.jsonl", orient="records", lines=True)
m = metrics.compute(rows.label, pred, [0.5] * len(rows), rows.generator)
(out / "metrics.json").write_text(json.dumps(m))
(out / "adapter").mkdir(exist_ok=True)
(out / "adapter" / "adapter_config.json").write_text("{}")
print("stand-in done")
print("---")
print(f"f1: {m['f1']:.6f}")
print("num_steps: 100")
print("training_seconds: 1.0")
print("peak_memory_gb: 0.1")
"""


def accuracy(ws, *per_seed, sleep=0.0):
    """Set the stand-in's accuracy per seed (an edit of train_dapo.py)."""
    f = ws / "train_dapo.py"
    text = "\n".join(f"ACCURACY = {list(per_seed)}" if line.startswith("ACCURACY = ") else
                     f"SLEEP = {sleep}" if line.startswith("SLEEP = ") else line for line in f.read_text().split("\n"))
    f.write_text(text)


@pytest.fixture(scope="module")
def sim(tiny_home, tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    repo = scratch_copy(ROOT, d)
    (d / "train_dapo.py").write_text(STANDIN)
    repo.index.add(["train_dapo.py"])
    repo.index.commit("stand-in training script")
    cli(d, "init", "sim")
    return d


@pytest.fixture
def run(sim, monkeypatch, capsys):
    """loop.run in this process, scoring from the stand-in's own predictions (no model to evaluate); returns the
    lines it printed."""
    monkeypatch.setattr(loop, "_score", lambda ws, run_dir: json.loads((run_dir / "metrics.json").read_text()))

    def go(description, **kw):
        loop.run(description, ws=loop.Workspace(sim), **kw)
        return capsys.readouterr().out.strip().splitlines()
    return go


def status_json(sim):
    out = cli(sim, "status", "--json").stdout
    return json.loads(out[out.index("{"):])


def test_baseline_runs_on_two_seeds(sim, run):
    lines = run("baseline")
    results_lines = [line for line in lines if not line.startswith(("progress:", "scoring val"))]
    assert results_lines[0].startswith("run 0001-") and ": baseline, seed 0," in results_lines[0]
    assert results_lines[1].startswith("keep    f1=") and "(the baseline, seed 0; a second seed follows" in \
        results_lines[1]
    assert results_lines[2].startswith("run 0002-") and "a repeat of the kept commit" in results_lines[2]
    assert ", seed 1," in results_lines[2]
    rows = results(sim)
    assert list(rows.columns) == ["commit", "f1", "accuracy", "memory_gb", "p_better", "status", "description",
                                  "seed", "seeds", "mean_f1", "p_keep"]
    assert rows.status.tolist() == ["keep", "repeat"] and rows.seed.tolist() == [0, 1]
    f1s = rows.f1.tolist()
    assert f1s[0] != f1s[1] and rows.seeds.tolist() == [1, 2]
    assert rows.mean_f1.tolist() == pytest.approx([f1s[0], np.mean(f1s)], abs=1e-6)
    assert lines[-1].startswith("repeat  f1=") and f"2 seeds, mean {np.mean(f1s):.4f}" in lines[-1]
    info = status_json(sim)
    assert info["seed_noise"]["df"] == 1 and info["seed_noise"]["sd"] == pytest.approx(np.std(f1s, ddof=1), abs=1e-6)
    assert info["best"]["seeds"] == 2 and info["best"]["mean_f1"] == pytest.approx(np.mean(f1s), abs=1e-6)
    assert [r["seed"] for r in info["recent"]] == [0, 1]


def test_borderline_gain_gets_a_confirming_run(sim, run):
    """Better on the bootstrap with one seed, but not beyond the baseline's seed spread: a second seed decides."""
    accuracy(sim, 0.90, 0.91)
    lines = run("borderline, confirmed")
    verdicts = [line for line in lines if line.split()[0] in ("keep", "discard", "confirm")]
    assert verdicts[0].startswith("confirm f1=") and "a confirming run on a new seed follows" in verdicts[0]
    assert "1 seed, mean" in verdicts[0] and "p_keep 0." in verdicts[0]
    assert any(line.startswith("run 0004-") and "the confirming run, seed 1" in line for line in lines)
    assert lines[-1].startswith("keep    f1=") and "2 seeds, mean" in lines[-1] and "confirmed on a second seed" \
        in lines[-1]
    rows = results(sim)
    assert rows.status.tolist()[-2:] == ["confirm", "keep"] and rows.commit.iloc[-1] == rows.commit.iloc[-2]
    assert rows.seed.tolist()[-2:] == [0, 1] and rows.seeds.tolist()[-2:] == [1, 2]
    assert 0.8 <= rows.p_better.iloc[-2] and rows.p_keep.iloc[-2] < 0.8 <= rows.p_keep.iloc[-1]
    info = status_json(sim)
    assert info["best"]["commit"] == rows.commit.iloc[-1] and info["best"]["seeds"] == 2
    assert info["seed_noise"]["df"] == 2 and info["confirms"] == 1


def test_zero_effect_edit_is_discarded(sim, run):
    repo = git.Repo(sim)
    kept = repo.head.commit.hexsha
    accuracy(sim, 0.90, 0.91, 0.5)  # the same runs as the best configuration on seeds 0 and 1
    lines = run("no real change")
    assert lines[-1].startswith("discard f1=") and "not better than the best" in lines[-1]
    assert repo.head.commit.hexsha == kept and "0.91, 0.5]" not in (sim / "train_dapo.py").read_text()


def test_unconfirmed_gain_is_discarded_with_both_runs(sim, run):
    accuracy(sim, 0.955, 0.87)
    lines = run("lucky seed")
    verdicts = [line.split()[0] for line in lines if line.split()[0] in ("keep", "discard", "confirm")]
    assert verdicts == ["confirm", "discard"] and "not confirmed on a second seed" in lines[-1]
    records = [json.loads(f.read_text()) for f in sorted((sim / "runs").glob("*/run.json"))][-2:]
    assert [r["status"] for r in records] == ["confirm", "discard"]
    assert not any((sim / "runs" / r["run_id"] / "adapter").exists() for r in records)  # a discarded commit's
    assert "ACCURACY = [0.955, 0.87]" in (sim / "runs" / records[-1]["run_id"] / "patch.diff").read_text()


def test_large_gain_is_kept_on_one_seed(sim, run):
    accuracy(sim, 0.99, 0.99)
    lines = run("large gain")
    assert [line.split()[0] for line in lines if line.split()[0] in ("keep", "discard", "confirm")] == ["keep"]
    assert "1 seed, mean" in lines[-1] and "better beyond both noises" in lines[-1]


def test_repeat_runs_the_kept_commit_on_a_new_seed(sim, run):
    repo = git.Repo(sim)
    head = repo.head.commit.hexsha
    r = cli(sim, "run", "again", check=False)
    assert r.returncode == 2 and "unchanged" in r.stderr and "--repeat" in r.stderr
    lines = run("check the large gain", repeat=True)
    assert lines[-1].startswith("repeat  f1=") and "seed 1 of the kept commit" in lines[-1]
    assert repo.head.commit.hexsha == head
    rows = results(sim)
    assert rows.status.iloc[-1] == "repeat" and rows.commit.iloc[-1] == head[:7] and rows.seeds.iloc[-1] == 2
    accuracy(sim, 0.5)
    r = cli(sim, "run", "--repeat", "dirty", check=False)
    assert r.returncode == 2 and "uncommitted edits" in r.stderr
    repo.git.checkout("--", "train_dapo.py")


def test_record_is_one_row_per_run_and_status_ranks_by_mean(sim):
    rows = results(sim)
    records = [json.loads(f.read_text()) for f in sorted((sim / "runs").glob("*/run.json"))]
    assert len(rows) == len(records)
    for row, rec in zip(rows.to_dict("records"), records):
        assert (row["commit"], row["status"], row["seed"], row["seeds"]) == (rec["commit"], rec["status"],
                                                                           rec["seed"], rec["seeds"])
        assert row["f1"] == pytest.approx(rec["f1"], abs=1e-6) and row["mean_f1"] == pytest.approx(rec["mean_f1"],
                                                                                                  abs=1e-6)
    info = status_json(sim)
    ranked = info["configurations"]
    assert [c["mean_f1"] for c in ranked] == sorted((c["mean_f1"] for c in ranked), reverse=True)
    by_commit = rows[rows.status.isin(loop.SCORED)].groupby("commit").f1
    for c in ranked:
        assert c["seeds"] == by_commit.size()[c["commit"]]
        assert c["mean_f1"] == pytest.approx(by_commit.mean()[c["commit"]], abs=1e-6)
    # pooled over every commit with more than one run, by numpy
    groups = [g.to_numpy() for _, g in by_commit if len(g) > 1]
    pooled = sum(((g - g.mean()) ** 2).sum() for g in groups) / sum(len(g) - 1 for g in groups)
    assert info["seed_noise"]["sd"] == pytest.approx(pooled ** 0.5, abs=1e-6)
    text = cli(sim, "status").stdout
    assert "seed noise: sd" in text and "configurations by mean val F1:" in text and "best: mean f1=" in text


def start(sim, description):
    """`autobuster run` in the background, once its training process is running: (runner, training pid)."""
    p = subprocess.Popen([sys.executable, "-m", "autobuster.cli", "run", description], cwd=sim,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = sim / ".autobuster" / "lock.json"
    for _ in range(300):
        if lock.exists() and "child" in lock.read_text():
            return p, json.loads(lock.read_text())["child"]
        time.sleep(0.1)
    raise AssertionError("the run did not start")


def gone(pid):
    """No such process, or a zombie: dead, its parent not reaping it (the CI container's init never does)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_runner_stops_training_and_keeps_a_later_edit(sim, sig):
    repo = git.Repo(sim)
    kept = repo.head.commit.hexsha
    accuracy(sim, 0.9, sleep=120)
    p, child = start(sim, f"interrupted by {sig.name}")
    accuracy(sim, 0.42, 0.42)  # the agent's next idea, written while the run is in progress
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig and f"interrupted by {sig.name}" in err and "Traceback" not in err
    assert out.strip().splitlines()[-1].startswith(f"crash   interrupted by {sig.name}  log=")
    assert gone(child)  # the training process went with it
    record = json.loads(sorted((sim / "runs").glob("*/run.json"))[-1].read_text())
    assert record["status"] == "crash" and record["note"] == f"interrupted by {sig.name}"
    assert results(sim).status.iloc[-1] == "crash" and repo.head.commit.hexsha == kept
    assert "ACCURACY = [0.42, 0.42]" in (sim / "train_dapo.py").read_text()  # not wiped by the reset
    assert "ACCURACY = [0.42, 0.42]" in (sim / "runs" / record["run_id"] / "edited_during_run.py").read_text()
    assert "ACCURACY = [0.9]" in (sim / "runs" / record["run_id"] / "patch.diff").read_text()
    repo.git.checkout("--", "train_dapo.py")


def test_an_edit_made_after_a_killed_runner_survives_its_recovery(sim):
    repo = git.Repo(sim)
    kept = repo.head.commit.hexsha
    accuracy(sim, 0.9, sleep=120)
    p, child = start(sim, "runner killed")
    p.kill()
    p.communicate()
    accuracy(sim, 0.43, 0.43)  # written after the kill, before any harness command
    out = cli(sim, "status").stdout
    assert "recovered run" in out and "kept your uncommitted edit of train_dapo.py" in out
    assert gone(child) and repo.head.commit.hexsha == kept
    assert "ACCURACY = [0.43, 0.43]" in (sim / "train_dapo.py").read_text()
    record = json.loads(sorted((sim / "runs").glob("*/run.json"))[-1].read_text())
    assert record["status"] == "crash" and record["note"].startswith("interrupted: the runner was killed")
    repo.git.checkout("--", "train_dapo.py")


def test_a_training_process_killed_by_a_signal_says_so(sim):
    accuracy(sim, 0.9, sleep=120)
    p, child = start(sim, "trainer killed")
    os.killpg(child, signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    assert out.strip().splitlines()[-1].startswith("crash   interrupted by SIGTERM (the training process)  log=")
    assert results(sim).status.iloc[-1] == "crash"
