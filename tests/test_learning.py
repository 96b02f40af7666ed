"""The proof that the RL loop learns from the video: train_dapo.py with its defaults on the tiny profile."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autobuster.demo import edit
from autobuster.loop import parse_summary

ROOT = Path(__file__).resolve().parents[1]


# The warm start scores val F1 ~0.4. Each prepare warm-starts its own tiny model (not bit for bit the same from run
# to run), and the model moves the outcome more than the seed does. With the tower's blocks left random by the warm
# start, fakes drawn by their generator's error and the tower at 7e-4, 15 of 15 runs in CI's conditions (2 cores,
# 300 s, ~1,000-1,260 steps) reached 0.886-0.963. On the device's slower cores 29 of 32 did (all 16 of its 530-540 s
# batches); the three misses, 0.82-0.85, came in its 480-490 s batches, one style or the real clips left behind
# (BENCHMARKS.md, "eighth session"). On 2026-12-01 CI's cores ran at half that speed (460 steps) and one run missed
# (0.837): draws sized by the kept share (OVERDRAW) then took the steps in 300 s here from 436 to 553.
TARGET = 0.85  # issue 3's target


@pytest.mark.slow
def test_dapo_raises_val_f1(tiny_home, tmp_path):
    env = {**os.environ, "AUTOBUSTER_RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run([sys.executable, "train_dapo.py"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = parse_summary(r.stdout)
    assert summary["training_seconds"] <= 330
    steps = [json.loads(line) for line in open(tmp_path / "run" / "train.jsonl")]
    quarter = len(steps) // 4
    first = sum(s["accuracy"] for s in steps[:quarter]) / quarter
    last = sum(s["accuracy"] for s in steps[-quarter:]) / quarter
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    rise = f"rollout accuracy {first:.3f} -> {last:.3f} from the first quarter to the last"
    assert summary["f1"] >= TARGET, f"val F1 {summary['f1']:.3f} after {summary['num_steps']:.0f} steps ({rise})"
    # sampled at temperature 1, rollout accuracy rises less than greedy val accuracy (~0.57 -> ~0.70 in the runs of
    # BENCHMARKS.md); each quarter's mean is over ~250 steps of 64+ replies, so 0.05 is far above its noise
    assert last > first + 0.05, rise


def test_qlora_switch_runs_on_the_tiny_model(tiny_home, tmp_path):
    """FOUR_BIT = True: NF4 base weights, LoRA on top; a short run trains, saves the adapter and is scored."""
    script = tmp_path / "train_dapo.py"
    shutil.copy(ROOT / "train_dapo.py", script)
    edit(script, ("FOUR_BIT = False", "FOUR_BIT = True"))
    env = {**os.environ, "AUTOBUSTER_RUN_DIR": str(tmp_path / "run"), "AUTOBUSTER_TIME_BUDGET": "8",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "f1" in parse_summary(r.stdout)
    steps = [json.loads(line) for line in open(tmp_path / "run" / "train.jsonl")]
    assert steps and all(s["grad_norm"] == s["grad_norm"] for s in steps)  # no NaN
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


@pytest.fixture(scope="module")
def qwen3_5_home(tiny_home, tmp_path_factory):
    """A home whose active setup is the tiny Qwen3.5 on the session's tiny clips (prepared in its own process, so the
    session's active setup stays the tiny Qwen2.5-VL)."""
    home = tmp_path_factory.mktemp("qwen3_5_home")
    (home / "tiny").symlink_to(Path(tiny_home) / "tiny")
    r = subprocess.run([sys.executable, "prepare.py", "--profile", "tiny", "--family", "qwen3.5"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "AUTOBUSTER_HOME": str(home)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(Qwen3.5, boxed format)" in r.stdout
    return home


def test_the_tiny_qwen3_5_trains_and_is_scored_in_the_2026_format(qwen3_5_home, tiny_home, tmp_path):
    """The tiny Qwen3.5 end to end: the run header names the family, its format and its linear-attention kernels; a
    short run trains through the hybrid engine (rollouts with copied states, the packed update), saves the adapter
    and is scored. The fixed evaluation then answers in the 2026 format, and a Qwen2.5-VL checkpoint evaluated on
    the same setup in its own format, on its own frame sizes and under another fingerprint."""
    env = {**os.environ, "AUTOBUSTER_HOME": str(qwen3_5_home), "AUTOBUSTER_RUN_DIR": str(tmp_path / "run"),
           "AUTOBUSTER_TIME_BUDGET": "8"}
    r = subprocess.run([sys.executable, "train_dapo.py"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Qwen3.5 (boxed format, delta rule torch, conv torch, decode step torch)" in r.stdout
    assert "f1" in parse_summary(r.stdout)
    steps = [json.loads(line) for line in open(tmp_path / "run" / "train.jsonl")]
    assert steps and steps[0]["format_rate"] > 0.5  # the warm start writes the 2026 format (0.80-0.97 sampled at 1)
    fingerprints = {}
    for name, model in (("q35", []), ("q25", ["--model", str(Path(tiny_home) / "tiny" / "model-qwen2.5-vl")])):
        args = ["--adapter", str(tmp_path / "run" / "adapter")] if name == "q35" else model
        r = subprocess.run([sys.executable, "evaluate.py", *args, "--limit", "8", "--out", str(tmp_path / name)],
                           cwd=ROOT, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        replies = [json.loads(line)["response"] for line in open(tmp_path / name / "predictions.jsonl")]
        tag = "\\boxed{" if name == "q35" else "<answer>"
        assert sum(tag in reply for reply in replies) >= 6, replies
        fingerprints[name] = json.loads((tmp_path / name / "metrics.json").read_text())["fingerprint"]
    assert fingerprints["q35"] != fingerprints["q25"]
