"""Video decoding (PyAV, the same decoder for training and evaluation), frame sampling and smart resize."""
import math
from dataclasses import dataclass

import av
import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from .profiles import FRAMES, MIN_PIXELS, SAMPLE_FPS

FACTOR = 28  # Qwen2.5-VL's patch 14 x spatial merge 2: frame sides are multiples of this (Qwen3.5: 32)


class BadVideo(Exception):
    """A clip that cannot be used (corrupt, empty, too short); the message is recorded in the manifest."""


@dataclass
class VideoInfo:
    fps: float
    frames: int
    width: int
    height: int
    duration: float


def sample_indices(fps: float, n: int = FRAMES, rate: float = SAMPLE_FPS) -> list[int]:
    """Indices of the frames shown at t = 0, 1/rate, 2/rate, ... (nearest frame, halves rounded up)."""
    return [int(math.floor(i * fps / rate + 0.5)) for i in range(n)]


def smart_resize(height: int, width: int, max_pixels: int, factor: int = FACTOR,
                 min_pixels: int = MIN_PIXELS) -> tuple[int, int]:
    """Qwen's per-frame resize rule: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect
    kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _open(path):
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadVideo(f"cannot open: {e}") from None


def probe(path) -> VideoInfo:
    """Container facts without decoding every frame; raises BadVideo for anything unusable."""
    with _open(path) as c:
        if not c.streams.video:
            raise BadVideo("no video stream")
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 0)
        if fps <= 0:
            raise BadVideo("unknown frame rate")
        duration = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
        frames = s.frames or int(round(duration * fps))
        return VideoInfo(fps, frames, s.codec_context.width, s.codec_context.height, duration)


def decode_clip(path, max_pixels: int, factor: int = FACTOR) -> np.ndarray:
    """16 frames at 4 fps as uint8 [16, H, W, 3], resized with smart resize to at most `max_pixels` per frame."""
    with _open(path) as c:
        if not c.streams.video:
            raise BadVideo("no video stream")
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        fps = float(s.average_rate or s.guessed_rate or 0)
        if fps <= 0:
            raise BadVideo("unknown frame rate")
        wanted = sample_indices(fps)
        picked, i = [], 0
        try:
            for frame in c.decode(s):
                if i == wanted[len(picked)]:
                    picked.append(frame.to_ndarray(format="rgb24"))
                    if len(picked) == FRAMES:
                        break
                i += 1
        except av.FFmpegError as e:
            raise BadVideo(f"decode error after {i} frames: {e}") from None
    if len(picked) < FRAMES:
        raise BadVideo(f"too short: {i} frames at {fps:g} fps, need {wanted[-1] + 1} for {FRAMES} frames at "
                       f"{SAMPLE_FPS:g} fps")
    return resize_frames(np.stack(picked), max_pixels, factor)


def resize_frames(frames: np.ndarray, max_pixels: int, factor: int = FACTOR) -> np.ndarray:
    _, h, w, _ = frames.shape
    nh, nw = smart_resize(h, w, max_pixels, factor)
    if (nh, nw) == (h, w):
        return frames
    t = torch.from_numpy(frames).permute(0, 3, 1, 2)
    t = TF.resize(t, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return t.permute(0, 2, 3, 1).contiguous().numpy()
