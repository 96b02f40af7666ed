"""The fixed evaluation end to end on the tiny model, and P(fake) at the answer letter."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autobuster import evaluation

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_py_on_val(tiny_home, tmp_path):
    r = subprocess.run([sys.executable, "evaluate.py", "--split", "val", "--limit", "40", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    f1_line = [line for line in r.stdout.splitlines() if line.startswith("f1:")]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert float(f1_line[0].split()[1]) == pytest.approx(m["f1"], abs=1e-6)
    preds = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert len(preds) == 40 and {"id", "label", "generator", "prediction", "p_fake", "response"} <= set(preds[0])
    assert sum(p["label"] == "fake" for p in preds) == 20  # --limit takes both labels in turn
    assert (tmp_path / "confusion.png").stat().st_size > 0
    assert m["unclear_rate"] <= 0.05  # the warm start writes the format
    assert all(0 <= p["p_fake"] <= 1 for p in preds)
    # P(fake) agrees with the greedy letter (argmax over A/B at the same step)
    for p in preds:
        if p["prediction"] != "unclear":
            assert (p["p_fake"] > 0.5) == (p["prediction"] == "fake")


def test_evaluate_py_no_think_mode(tiny_home, tmp_path):
    """--mode no_think: the /no_think prompt, a few decoded tokens, and the share of replies that still think."""
    r = subprocess.run([sys.executable, "evaluate.py", "--limit", "16", "--mode", "no_think", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    preds = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert m["mode"] == "no_think" and len(preds) == 16
    assert m["think_rate"] == pytest.approx(sum("<think>" in p["response"] for p in preds) / 16)
    assert f"think_rate    {m['think_rate']:.6f}" in r.stdout
    # the warm start never saw the switch and thinks: its whole reply is 18 tokens, so within NO_THINK_MAX_NEW_TOKENS
    # (16) a reply that thinks is cut or ends malformed, and gives no answer
    assert any(p["truncated"] for p in preds)
    assert all(p["prediction"] == "unclear" for p in preds if "<think>" in p["response"])


def test_evaluate_py_rejects_an_unknown_mode(tiny_home):
    r = subprocess.run([sys.executable, "evaluate.py", "--mode", "fast"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_py_on_one_video_and_a_folder(tiny_home, tmp_path):
    video = next(Path(tiny_home, "tiny", "videos", "test", "real").glob("*.mp4"))
    (tmp_path / "bad.mp4").write_bytes(b"nope")
    (tmp_path / "a.mp4").write_bytes(video.read_bytes())
    r = subprocess.run([sys.executable, "evaluate.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "verdict:" in r.stdout and "p_fake:" in r.stdout and "1 videos scored, 1 skipped" in r.stdout


class _Tok:
    """A tokenizer stand-in with a vocabulary where the letter merges with '>' (as byte-level BPE does)."""
    vocab = {"<": 0, "answer": 1, ">A": 2, ">B": 3, "</": 4, ">": 5, "A": 6, "B": 7, "x": 8}

    def get_vocab(self):
        return self.vocab

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_p_fake_is_the_softmax_of_the_letter_logits():
    tok = _Tok()
    pairs = evaluation.letter_pairs(tok)
    assert pairs[2] == (2, 3) and pairs[7] == (6, 7) and 8 not in pairs
    track = sorted(pairs)
    column = {t: j for j, t in enumerate(track)}
    ids = [8, 0, 1, 3, 4, 1, 5]  # x<answer>B</answer>
    tracked = np.zeros((len(ids), len(track)), np.float32)
    tracked[3, column[2]], tracked[3, column[3]] = 0.5, 2.0
    p = evaluation.answer_p_fake(tok, ids, tracked, pairs, column, "<answer>")
    assert p == pytest.approx(np.exp(2.0) / (np.exp(0.5) + np.exp(2.0)), abs=1e-6)
    assert evaluation.answer_p_fake(tok, [8, 8], tracked, pairs, column, "<answer>") == 0.5
