"""Every bad input gets one clear line and the rest of the work goes on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autobuster import dataset, model, profiles
from autobuster.errors import UserError
from autobuster.synthetic import write_mp4
from autobuster.video import BadVideo, decode_clip

ROOT = Path(__file__).resolve().parents[1]


def clip(path, n=100, fps=24, seed=0):
    write_mp4(path, np.random.default_rng(seed).integers(0, 255, (n, 112, 112, 3), dtype=np.uint8), fps, False)


@pytest.fixture
def custom(tmp_path):
    d = tmp_path / "mine"
    for i in range(6):  # distinct clips: the same content in train and test is refused
        clip(d / "real" / f"r{i}.mp4", seed=i)
        clip(d / "fake" / "gen1" / f"f{i}.mp4", seed=10 + i)
    (d / "real" / "empty.mp4").write_bytes(b"")
    good = (d / "real" / "r0.mp4").read_bytes()
    (d / "real" / "corrupt.mp4").write_bytes(good[:200] + b"\x00" * 300)
    clip(d / "fake" / "gen1" / "short.mp4", n=40)  # 40 frames at 24 fps: under the 91 that 16 at 4 fps need
    (d / "fake" / "notes.txt").write_text("not a video")
    return d


def test_custom_folder_skips_and_counts_bad_files(custom, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBUSTER_HOME", str(tmp_path / "home"))
    setup = profiles.Setup("tiny", str(tmp_path / "home" / "x"), str(custom), "")
    Path(setup.root).mkdir(parents=True)
    df = dataset.build_manifest(dataset.resolve_source(custom), setup)
    status = dict(zip(df.path, df.status))
    assert status["real/empty.mp4"].startswith("cannot open")
    assert status["real/corrupt.mp4"] != "ok"
    assert status["fake/gen1/short.mp4"].startswith("too short")
    assert status["fake/notes.txt"] != "ok"
    assert (df.status == "ok").sum() == 12
    assert "4 skipped" in dataset.report_skipped(df)
    assert set(df[df.path.str.startswith("fake/gen1")].generator) == {"gen1"}


@pytest.mark.parametrize("data", [b"", b"\x00" * 1000])
def test_decode_of_broken_files_raises_badvideo(tmp_path, data):
    (tmp_path / "b.mp4").write_bytes(data)
    with pytest.raises(BadVideo):
        decode_clip(tmp_path / "b.mp4", 56 * 56)


def test_too_short_clip_is_reported(tmp_path):
    clip(tmp_path / "s.mp4", n=40)
    with pytest.raises(BadVideo, match="too short"):
        decode_clip(tmp_path / "s.mp4", 56 * 56)


def test_folder_without_real_or_fake(tmp_path):
    (tmp_path / "videos").mkdir()
    with pytest.raises(UserError, match="real/"):
        dataset.resolve_source(tmp_path)
    (tmp_path / "real").mkdir()
    with pytest.raises(UserError, match="both a real/ and a fake/"):
        dataset.scan(tmp_path)


def test_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBUSTER_HOME", str(tmp_path))
    with pytest.raises(UserError, match="prepare.py"):
        profiles.active()


def test_unknown_profile():
    with pytest.raises(UserError, match="tiny"):
        profiles.get_profile("huge")


def test_old_transformers_refused(monkeypatch):
    monkeypatch.setattr(model.transformers, "__version__", "5.17.0")
    with pytest.raises(UserError, match="5.18"):
        model.check_transformers()


def test_genbuster_without_cuda(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA"):
        profiles.Setup("genbuster", "/x", "/x", "m").check_device()


@pytest.mark.parametrize("args,message", [
    (["prepare.py", "--profile", "huge"], "unknown profile"),
    (["prepare.py", "--dataset", "/nonexistent/folder"], "not a folder"),
    (["prepare.py", "--profile", "tiny", "--model", "/nonexistent/model"], "no model directory at /nonexistent/model"),
])
def test_cli_prints_one_line_not_a_traceback(args, message, tmp_path):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       env={"AUTOBUSTER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.parametrize("model_type,message", [
    ("qwen3_vl", "is a Qwen3-VL checkpoint: autobuster runs Qwen2.5-VL and Qwen3.5 models (BusterX++: "
                 "l8cv/BusterX_plusplus on Qwen2.5-VL-7B, l8cv/BusterX-plusplus on Qwen3.5-4B)"),
    ("llama", "is a model_type 'llama' checkpoint: autobuster runs Qwen2.5-VL and Qwen3.5 models"),
])
def test_a_checkpoint_of_another_family_gets_one_line(model_type, message, tmp_path):
    """Prepare stops before fetching anything, and loading refuses it, with the family and what to use instead."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": model_type}))
    r = subprocess.run([sys.executable, "prepare.py", "--profile", "tiny", "--model", str(ckpt)], cwd=ROOT,
                       capture_output=True, text=True,
                       env={"AUTOBUSTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {ckpt} {message}")
    with pytest.raises(UserError, match="autobuster runs Qwen2.5-VL and Qwen3.5 models"):
        model.load(str(ckpt))


def one_error_line(r, message):
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_a_dataset_without_a_val_set_gives_one_line(tmp_path, monkeypatch):
    """evaluate.py and `autobuster init` on a prepared dataset whose val set is missing."""
    from autobuster.demo import scratch_copy
    home = tmp_path / "home"
    monkeypatch.setenv("AUTOBUSTER_HOME", str(home))
    profiles.save_active(profiles.Setup("tiny", str(home / "x"), str(home / "x"), str(home / "model")))
    env = {**os.environ, "AUTOBUSTER_HOME": str(home)}
    r = subprocess.run([sys.executable, "evaluate.py", "--split", "val"], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    one_error_line(r, "no pinned val set")
    scratch_copy(ROOT, tmp_path / "ws")
    r = subprocess.run([sys.executable, "-m", "autobuster.cli", "init", "t"], cwd=tmp_path / "ws",
                       capture_output=True, text=True, env=env)
    one_error_line(r, "no pinned val set")


def test_evaluate_on_files_that_cannot_be_scored_fails(tiny_home, tmp_path):
    """A folder (or one file) of which no video decodes: the skipped lines, then one error, exit 2."""
    env = {**os.environ, "AUTOBUSTER_HOME": tiny_home}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.mp4").write_bytes(b"")
    clip(tmp_path / "bad" / "short.mp4", n=40)
    for target in (tmp_path / "bad", tmp_path / "bad" / "empty.mp4"):
        r = subprocess.run([sys.executable, "evaluate.py", str(target)], cwd=ROOT, capture_output=True, text=True,
                           env=env)
        one_error_line(r, "no video could be scored")
        assert "skipped" in r.stdout
