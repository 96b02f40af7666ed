"""BusterX++ stages 2 and 3 in train_dapo.py: fusion pairs, the hybrid and thinking rewards, and a tiny run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autobuster.demo import edit
from autobuster.loop import parse_summary

ROOT = Path(__file__).resolve().parents[1]
THINK_A = "<think>the colours flicker</think><answer>A</answer>"
THINK_B = "<think>the edges shimmer</think><answer>B</answer>"


@pytest.fixture(scope="module")
def td(tiny_home):
    import train_dapo
    return train_dapo


def test_fusion_pairs_come_from_the_first_right_well_formed_reply(td):
    replies = ["<answer>B</answer>",  # right but not the stage-1 format
               "<think>x</think><answer>A</answer>",  # well formed but wrong
               "  " + THINK_B + "\n",
               "<think>later</think><answer>B</answer>"]
    assert td.fusion_pairs(replies, "fake") == [("think", THINK_B), ("no_think", "<answer>B</answer>")]
    assert td.fusion_pairs(replies, "real") == [("think", "<think>x</think><answer>A</answer>"),
                                                ("no_think", "<answer>A</answer>")]
    assert td.fusion_pairs(["<think>x</think><answer>A</answer>", "no answer"], "fake") == []


@pytest.mark.parametrize("reply,mode,reward", [
    (THINK_A, "think", 0.0),
    ("<answer>A</answer>", "think", -1.0),
    ("<answer>A</answer>", "no_think", 0.0),
    (THINK_A, "no_think", -1.0),
    ("<think>unfinished", "no_think", -1.0),
    ("B", "no_think", 0.0),  # obeys the mode; the format reward is what punishes it
])
def test_hybrid_reward(td, reply, mode, reward):
    assert td.hybrid_reward(reply, mode) == reward


def test_format_reward_follows_the_mode(td):
    assert td.format_reward("<answer>B</answer>", "no_think") == 0.0
    assert td.format_reward(THINK_B, "no_think") == -1.0
    assert td.format_reward("<answer>B</answer>", "think") == -1.0
    assert td.format_reward(THINK_B, "think") == 0.0


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_home, tmp_path_factory):
    """A random tiny Qwen2.5-VL directory standing in for SophiaVL-R1-Thinking-Reward-Model-3B."""
    from autobuster import tiny
    from autobuster.profiles import active
    path = tmp_path_factory.mktemp("reward_model")
    tiny.build(path, active().settings.pixel_cap)
    return str(path)


def test_thinking_reward_is_never_above_accuracy(td, tiny_reward_model):
    from autobuster import dataset
    clips = dataset.TrainClips(td.SETUP, seed=1)
    drawn = clips.batch(4)
    clips.close()
    scorer = td.RewardModelScorer(tiny_reward_model)
    for stub, m in ((scorer, None), (lambda r, f: 7.0, 1.0), (lambda r, f: -3.0, 0.0), (lambda r, f: 0.25, 0.25)):
        for row, frames in drawn:
            for reply in (THINK_A, THINK_B, "<answer>A</answer>", "nothing"):
                right = reply.endswith("<answer>" + "AB"[row["label"] == "fake"] + "</answer>")
                got = td.thinking_reward(reply, frames, float(right), "think", stub)
                assert 0.0 <= got <= float(right)
                if m is not None:  # a known score, clamped to [0, 1], counts only on a right answer
                    assert got == (m if right else 0.0)
                assert td.thinking_reward(reply, frames, float(right), "no_think", stub) == 0.0
                assert td.thinking_reward(reply, frames, float(right), "think", None) == 0.0
    assert 0.0 <= scorer(THINK_A, drawn[0][1]) <= 1.0


def test_tiny_run_with_stages_2_and_3(tiny_home, tmp_path):
    """Stage 2 on a few clips at once (stage 1 is the default run's), then stage 3 with no scorer: it says so,
    trains in both modes and prints the summary with both modes' F1."""
    script = tmp_path / "train_dapo.py"
    script.write_text((ROOT / "train_dapo.py").read_text())
    edit(script, ("STAGE2 = False", "STAGE2 = True"), ("STAGE3 = False", "STAGE3 = True"),
         ("FUSION_CLIPS = 256 if TINY", "FUSION_CLIPS = 8 if TINY"), ("STAGE1_SHARE = 0.5", "STAGE1_SHARE = 0.0"))
    env = {**os.environ, "AUTOBUSTER_RUN_DIR": str(tmp_path / "run"), "AUTOBUSTER_TIME_BUDGET": "20",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sum("thinking reward off" in line for line in r.stdout.splitlines()) == 1
    records = [json.loads(line) for line in open(tmp_path / "run" / "train.jsonl")]
    assert records[0]["stage"] == 2 and records[0]["pairs"] > 0 and 0 <= records[0]["no_think_obeyed"] <= 1
    assert len(records) > 1 and all(rec["stage"] == 3 for rec in records[1:])
    summary = parse_summary(r.stdout)
    for key in ("f1", "f1_no_think", "no_think_think_rate", "training_seconds", "num_steps"):
        assert key in summary, key
    assert 0.0 <= summary["no_think_think_rate"] <= 1.0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
