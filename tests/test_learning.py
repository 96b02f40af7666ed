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
# (BENCHMARKS.md, "eighth session").
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
