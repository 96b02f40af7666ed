"""The loop on the tiny profile: keep, discard, crash, tampering, a killed runner, export round trip."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import pandas as pd
import pytest
from sklearn import metrics as skm

from autobuster import loop
from autobuster.demo import BROKEN, CRASH, edit, scratch_copy

ROOT = Path(__file__).resolve().parents[1]


def cli(ws, *args, check=True):
    r = subprocess.run([sys.executable, "-m", "autobuster.cli", *args], cwd=ws, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def results(ws):
    return pd.read_csv(ws / "results.tsv", sep="\t", dtype={"commit": str}, keep_default_na=False)


@pytest.fixture(scope="module")
def ws(tiny_home, tmp_path_factory):
    d = tmp_path_factory.mktemp("ws")
    scratch_copy(ROOT, d)
    cli(d, "init", "t")
    return d


def test_init_refuses_an_existing_tag(ws):
    r = cli(ws, "init", "t", check=False)
    assert r.returncode == 2 and "exists" in r.stderr


def test_baseline_is_kept_and_run_on_a_second_seed(ws):
    lines = cli(ws, "run", "baseline", "--budget", "20").stdout.strip().splitlines()
    verdicts = [line for line in lines if not line.startswith(("progress: ", "scoring val (", "run 000"))]
    heads = [line for line in lines if line.startswith("run 000")]
    assert len(heads) == 2 and all("profile tiny" in h and "run.log" in h for h in heads)
    assert ": baseline, seed 0," in heads[0] and ": a repeat of the kept commit" in heads[1] and ", seed 1," in heads[1]
    assert [v.split()[0] for v in verdicts] == ["keep", "repeat"] and "(the baseline, seed 0;" in verdicts[0]
    assert lines[-2].startswith("scoring val (")  # life, then the verdict
    rows = results(ws)
    assert list(rows.columns)[:7] == ["commit", "f1", "accuracy", "memory_gb", "p_better", "status", "description"]
    assert rows.status.tolist() == ["keep", "repeat"] and rows.seed.tolist() == [0, 1]
    for i, run in enumerate(sorted((ws / "runs").glob("000[12]-*"))):
        assert (run / "adapter" / "adapter_config.json").exists() and (run / "metrics.json").exists()
        # the score comes from the separate evaluation: its predictions, scored by scikit-learn, give the row's F1
        # and accuracy (a 20 s policy may well answer one class only, so the values themselves are not asserted)
        preds = pd.read_json(run / "predictions.jsonl", lines=True)
        y = (preds.label == "fake").astype(int)
        pred = (preds.prediction == "fake").astype(int).where(preds.prediction != "unclear", 1 - y)
        assert len(preds) == json.loads((run / "metrics.json").read_text())["n"] > 0
        assert rows.f1[i] == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=1e-6)
        assert rows.accuracy[i] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
        # the result line and status --json carry the step count that train_dapo.py's summary reported, and the
        # seed the runner gave it is the one it trained with
        log = (run / "run.log").read_text()
        steps = int(next(line.split()[1] for line in log.splitlines() if line.startswith("num_steps:")))
        assert f"steps={steps} " in verdicts[i] and steps > 0
        info = json.loads(cli(ws, "status", "--json").stdout)
        assert info["recent"][i]["run_id"] == run.name and info["recent"][i]["steps"] == steps
        assert json.loads((run / "run.json").read_text())["seed"] == i
    assert info["seed_noise"]["df"] == 1 and info["best"]["seeds"] == 2


def test_unchanged_file_is_refused(ws):
    r = cli(ws, "run", "nothing", check=False)
    assert r.returncode == 2 and "unchanged" in r.stderr


def test_worse_variant_is_discarded_and_reset(ws):
    repo = git.Repo(ws)
    kept = repo.head.commit.hexsha
    edit(ws / "train_dapo.py", *BROKEN)
    lines = cli(ws, "run", "broken lora", "--budget", "0").stdout.strip().splitlines()
    out = lines[-1]
    assert out.startswith("discard") and "steps=0 " in out
    assert lines[-2].startswith("warning: 0 steps against")  # a budget of 0 makes no step: said, above the result
    assert repo.head.commit.hexsha == kept and "100000" not in (ws / "train_dapo.py").read_text()
    run = sorted((ws / "runs").glob("0003-*"))[0]
    assert "LORA_ALPHA = 100000" in (run / "patch.diff").read_text()
    assert not (run / "adapter").exists()
    assert results(ws).status.tolist() == ["keep", "repeat", "discard"]


def test_crash_is_recorded_and_reset(ws):
    repo = git.Repo(ws)
    kept = repo.head.commit.hexsha
    edit(ws / "train_dapo.py", CRASH)
    out = cli(ws, "run", "crash", "--budget", "0").stdout.strip().splitlines()[-1]
    assert out.startswith("crash") and "scripted crash" in out
    rows = results(ws)
    assert rows.status.tolist()[-1] == "crash" and rows.f1.tolist()[-1] == 0 and rows.memory_gb.tolist()[-1] == 0
    assert repo.head.commit.hexsha == kept and "scripted crash" not in (ws / "train_dapo.py").read_text()


def test_tampered_fixed_file_is_refused(ws):
    ev = ws / "evaluate.py"
    original = ev.read_text()
    ev.write_text(original + "\n# tampered\n")
    edit(ws / "train_dapo.py", ("LORA_RANK = 16", "LORA_RANK = 8"))
    try:
        r = cli(ws, "run", "tampered", check=False)
        assert r.returncode == 2 and "evaluate.py" in r.stderr
        assert len(results(ws)) == 4
    finally:
        ev.write_text(original)


def test_killed_runner_is_recovered_by_the_next_command(ws):
    repo = git.Repo(ws)
    kept = repo.head.commit.hexsha
    p = subprocess.Popen([sys.executable, "-m", "autobuster.cli", "run", "killed", "--budget", "60"], cwd=ws,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = ws / ".autobuster" / "lock.json"
    for _ in range(300):
        if lock.exists() and "child" in lock.read_text():
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert repo.head.commit.hexsha != kept  # the runner died with its commit on the branch
    out = cli(ws, "status", "--json").stdout
    info = json.loads(out[out.index("{"):])
    assert results(ws).status.tolist()[-1] == "crash" and info["crashes"] == 2
    assert repo.head.commit.hexsha == kept and not lock.exists()
    assert (ws / "progress.png").stat().st_size > 0
    child = json.loads((sorted((ws / "runs").glob("*/run.json"))[-1]).read_text())
    assert child["note"].startswith("interrupted")


def test_export_round_trip(ws):
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401  (loads like any checkpoint)
    from autobuster import evaluation
    from autobuster.model import load
    from autobuster.profiles import active
    r = subprocess.run([sys.executable, "export.py", "--out", str(ws / "exported")], cwd=ws, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    out = ws / "exported"
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert "Holdout" in (out / "README.md").read_text()
    assert json.loads((out / "generation_config.json").read_text()).get("do_sample") in (False, None)
    model, processor = load(str(out))
    m, _ = evaluation.evaluate_model(model, processor, active(), "val")
    best = loop.Workspace(ws).best_kept()  # the baseline; its better seed is the one exported
    assert f"({best['run_id']})" in (out / "README.md").read_text().splitlines()[0]
    f1 = {i: json.loads((ws / "runs" / i / "run.json").read_text())["f1"] for i in best["run_ids"]}
    assert best["run_id"] == max(f1, key=f1.get)
    assert m["f1"] == pytest.approx(json.loads((ws / "runs" / best["run_id"] / "metrics.json").read_text())["f1"],
                                    abs=1e-6)


def test_two_processes_under_torchrun(ws):
    out = cli(ws, "train", "--hours", "0.003", "--gpus", "2").stdout.strip().splitlines()[-1]
    assert out.startswith("long")
    run = sorted((ws / "runs").glob("*-long"))[-1]
    log = (run / "run.log").read_text()
    assert "ranks 2" in log and [line.strip() for line in log.splitlines()].count("---") == 1  # rank 1 prints nothing
    steps = int(next(line.split()[1] for line in log.splitlines() if line.startswith("num_steps:")))
    assert steps > 0 and len((run / "train.jsonl").read_text().splitlines()) == steps  # rank 0 alone logs
    assert (run / "adapter" / "adapter_config.json").exists() and results(ws).status.tolist()[-1] == "long"


def test_progress_line_reads_the_run_in_progress(tmp_path):
    from autobuster.loop import progress
    assert progress(tmp_path, 300, 12.4) == "progress: loading, no step yet (12s since start)"
    recs = [dict(step=i, elapsed=2.0 * i, accuracy=i / 30, format_rate=1.0 - i / 100) for i in range(30)]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 30, "elap'  # a line being written
    (tmp_path / "train.jsonl").write_text(text)
    last = recs[-20:]
    acc, fmt = sum(r["accuracy"] for r in last) / 20, sum(r["format_rate"] for r in last) / 20
    assert progress(tmp_path, 300, 99) == (f"progress: step 29 | 58s of 300s trained | rollout acc {acc:.3f} | "
                                           f"fmt {fmt:.3f} (last 20 steps)")
