"""Frame sampling, decoding (HEVC 10-bit included) and smart resize, against independent references."""
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from autobuster import synthetic
from autobuster.video import decode_clip, sample_indices, smart_resize


def numbered_clip(path, fps, n, hevc10=False):
    """Frame k is flat with red = 16 (k mod 16) and green = 16 (k // 16), so its index can be read back."""
    frames = np.zeros((n, 112, 112, 3), np.uint8)
    for k in range(n):
        frames[k, ..., 0], frames[k, ..., 1] = 16 * (k % 16), 16 * (k // 16)
    synthetic.write_mp4(path, frames, fps, hevc10)


@pytest.mark.parametrize("fps", [24, 25, 30])
@pytest.mark.parametrize("hevc10", [False, True])
def test_decoded_frames_are_the_4fps_ones(tmp_path, fps, hevc10):
    numbered_clip(tmp_path / "c.mp4", fps, 5 * fps, hevc10)
    frames = decode_clip(tmp_path / "c.mp4", 112 * 112)
    # oracle: the frame on screen nearest to t = i / 4 s (halves up), computed from timestamps
    expected = [int(np.floor(i / 4 * fps + 0.5)) for i in range(16)]
    got = [int(round(f[..., 0].mean() / 16)) + 16 * int(round(f[..., 1].mean() / 16)) for f in frames]
    assert got == expected
    assert frames.shape == (16, 112, 112, 3) and frames.dtype == np.uint8


def test_sample_indices_24fps_is_every_sixth():
    assert sample_indices(24) == list(range(0, 91, 6))


@pytest.mark.parametrize("h,w,cap", [(1024, 1024, 448 * 448), (1080, 1920, 448 * 448), (112, 112, 56 * 56),
                                     (720, 1280, 756 * 756), (100, 60, 448 * 448), (1024, 1024, 2 ** 30)])
def test_smart_resize_matches_transformers(h, w, cap):
    assert smart_resize(h, w, cap) == hf_smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=cap)


def test_frames_are_resized_to_the_cap(tmp_path):
    numbered_clip(tmp_path / "c.mp4", 24, 100)
    assert decode_clip(tmp_path / "c.mp4", 56 * 56).shape == (16, 56, 56, 3)


def test_synthetic_build_remakes_only_missing_clips(tiny_home, tmp_path):
    """A clip lost mid-build (its worker killed: only a .part file left) is remade on the next build with the same
    frames; the clips already there are not touched."""
    videos = tmp_path / "videos"
    shutil.copytree(Path(tiny_home) / "tiny" / "videos", videos)
    lost = videos / "train" / "fake" / "stutter" / "train_stutter_0003.mp4"
    original = decode_clip(lost, 112 * 112)
    lost.rename(lost.with_name(lost.name + ".part"))
    kept = {p: p.stat().st_mtime_ns for p in videos.rglob("*.mp4") if p.name.split("_")[1] in ("real", "tint")}
    synthetic.build(videos)
    # same seed, same frames, up to the encoder's rounding (its threads make the bits vary from run to run)
    assert np.abs(decode_clip(lost, 112 * 112).astype(int) - original).mean() < 2
    assert not list(videos.rglob("*.part"))
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())


@pytest.mark.parametrize("sig, message", [(signal.SIGSTOP, "restarting the clip workers"),
                                          (signal.SIGKILL, "a clip worker died")])
def test_synthetic_build_replaces_workers_that_stall_or_die(tmp_path, monkeypatch, capsys, sig, message):
    """Workers stuck mid-clip (here stopped by a signal) never report: when no clip has finished for STALL_SECONDS,
    they are killed. Killed workers break the pool. Either way the clips still missing are made by a fresh pool,
    and the caller's other child processes are left alone."""
    monkeypatch.setattr(synthetic, "LAYOUT", (("train", 24, 8, ("flicker", "tint")),))
    monkeypatch.setattr(synthetic, "STALL_SECONDS", 5)
    bystander = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(300,))
    bystander.start()

    def signal_workers():
        while not any(tmp_path.rglob("*.mp4")):
            time.sleep(0.02)
        for worker in multiprocessing.active_children():
            if worker.pid != bystander.pid:
                os.kill(worker.pid, sig)

    threading.Thread(target=signal_workers, daemon=True).start()
    try:
        synthetic.build(tmp_path)
        assert bystander.is_alive()
    finally:
        bystander.kill()
    assert message in capsys.readouterr().out
    assert len(list(tmp_path.rglob("*_0*.mp4"))) == 24 + 8 + 8
