"""A synthetic GenBuster-shaped dataset for the tiny profile: real mp4 files, real and fake clips that differ
visibly within frames and across frames.

Real clips are smooth scenes (a drifting gradient, a slow texture, moving ellipses, light sensor noise). Each
fake "generator" leaves its own artefact on the same kind of scene. Train and test share the four seen styles;
the benchmark uses three unseen ones, so generalisation to unseen generators is measurable offline.
"""
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

SIZE = 112  # frame side in pixels (smart-resized to 56² by the tiny profile's pixel cap)
SECONDS = 4.0  # enough for 16 frames at 4 fps at every frame rate used
SEEN = ("flicker", "tint", "checker", "stutter")  # train + test generators
UNSEEN = ("posterize", "stripes", "pulse")  # benchmark generators
# (split, real clips, fake clips per generator, generators)
LAYOUT = (("train", 200, 50, SEEN), ("test", 80, 20, SEEN), ("benchmark", 60, 20, UNSEEN))
STALL_SECONDS = 120  # no clip finished for this long: the clip workers are stuck (a clip takes ~0.3 s)


def scene(rng: np.random.Generator, n: int) -> np.ndarray:
    """A smooth, slowly moving scene as float32 [n, SIZE, SIZE, 3] in 0..255."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    t = np.arange(n, dtype=np.float32)[:, None, None] / n
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    ang, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4)
    ramp = (np.cos(ang) * x + np.sin(ang) * y + speed * t) % 1.0
    ramp = 0.5 - 0.5 * np.cos(2 * np.pi * ramp)  # periodic, so the drift has no seam
    frames = c0 + (c1 - c0) * ramp[..., None]
    kx, ky = rng.uniform(2, 5, 2)
    frames += 12 * (np.sin(2 * np.pi * (kx * x + 0.3 * t)) * np.sin(2 * np.pi * ky * y))[..., None]
    for _ in range(rng.integers(1, 3)):
        colour = rng.uniform(0, 255, 3)
        p0, v = rng.uniform(0.2, 0.8, 2), rng.uniform(-0.25, 0.25, 2)
        r = rng.uniform(0.08, 0.2, 2)
        cx, cy = (p0[0] + v[0] * t) % 1.0, (p0[1] + v[1] * t) % 1.0
        inside = ((x - cx) / r[0]) ** 2 + ((y - cy) / r[1]) ** 2 < 1
        frames = np.where(inside[..., None], colour, frames)
    return frames + rng.normal(0, 2.0, frames.shape).astype(np.float32)


def apply_style(frames: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    n = len(frames)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if style == "real":
        return frames
    if style == "flicker":  # independent exposure per frame
        return frames * rng.uniform(0.55, 1.45, (n, 1, 1, 1))
    if style == "tint":  # a magenta cast: the green channel collapses
        return frames * np.array([1.0, 0.25, 0.9]) + np.array([40.0, 0.0, 30.0])
    if style == "checker":  # an 8-pixel checkerboard texture
        return frames + 45.0 * (((x // 8 + y // 8) % 2) * 2 - 1)[None, :, :, None]
    if style == "stutter":  # the whole frame jumps each frame, wrapping with a visible seam
        return np.stack([np.roll(f, tuple(rng.integers(-24, 25, 2)), axis=(0, 1)) for f in frames])
    if style == "posterize":  # colours collapse to 3 levels per channel
        return np.round(np.clip(frames, 0, 255) / 127.5) * 127.5
    if style == "stripes":  # horizontal bands
        return frames + 40.0 * (((y // 5) % 2) * 2 - 1)[None, :, :, None]
    if style == "pulse":  # slow exposure swings
        return frames * (1 + 0.45 * np.sin(np.arange(n) * rng.uniform(0.8, 1.6)))[:, None, None, None]
    raise ValueError(style)


def write_mp4(path: Path, frames: np.ndarray, fps: int, hevc10: bool) -> None:
    """Encode uint8 RGB frames: H.264 8-bit, or HEVC 10-bit (yuv420p10le) like GenBuster's clips. Written under
    a temporary name and renamed, so a worker killed mid-clip leaves no truncated .mp4 that a rerun would keep."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with av.open(str(part), "w", format="mp4") as c:
        if hevc10:
            s = c.add_stream("libx265", rate=fps, options={"crf": "16", "x265-params": "log-level=error"})
            s.pix_fmt = "yuv420p10le"
        else:
            s = c.add_stream("libx264", rate=fps, options={"crf": "16"})
            s.pix_fmt = "yuv420p"
        s.width = s.height = SIZE
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    os.replace(part, path)


def make_clip(job: tuple) -> None:
    path, style, seed = job
    rng = np.random.default_rng(seed)
    fps = int(rng.choice([24, 24, 25, 30]))
    frames = apply_style(scene(rng, int(SECONDS * fps)), style, rng)
    write_mp4(Path(path), np.clip(frames, 0, 255).astype(np.uint8), fps, hevc10=bool(rng.random() < 0.25))


def make_clips(jobs: list, workers: int, attempt: int) -> bool:
    """Make the clips in a fresh pool; False when a worker died or none finished a clip for STALL_SECONDS.

    Spawned, not forked, workers: a fork of a process that has started torch's threads (pytest's, after collection)
    can die at random. One worker has been seen to spin in an encode for good, hence the stall check; the caller
    gives the clips still missing a fresh pool."""
    others = set(multiprocessing.active_children())  # the caller's own children, which a stall must spare
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = {pool.submit(make_clip, job) for job in jobs}
        with tqdm(total=len(jobs), desc="synthetic clips") as bar:
            while pending:
                done, pending = wait(pending, STALL_SECONDS, return_when=FIRST_COMPLETED)
                if not done:
                    print(f"no clip finished in {STALL_SECONDS} s (attempt {attempt}); restarting the clip workers")
                    for worker in set(multiprocessing.active_children()) - others:
                        worker.kill()
                    return False
                for future in done:
                    future.result()
                bar.update(len(done))
        return True
    except BrokenProcessPool:
        print(f"a clip worker died (attempt {attempt}); starting a fresh pool for the clips left")
        return False
    finally:
        pool.shutdown(cancel_futures=True)


def build(root: Path, workers: int = 2) -> None:
    """Write the dataset as `<split>/real/*.mp4` and `<split>/fake/<generator>/*.mp4` (GenBuster's layout).

    Idempotent: existing clips are kept. Two broken files in train (empty, truncated) show the skip path."""
    jobs, seed = [], 0
    for split, n_real, n_fake, styles in LAYOUT:
        groups = [("real", root / split / "real", n_real)]
        groups += [(g, root / split / "fake" / g, n_fake) for g in styles]
        for style, folder, n in groups:
            for i in range(n):
                seed += 1
                # names unique across splits, as GenBuster's are (prepare refuses a file name in two splits)
                jobs.append((str(folder / f"{split}_{style}_{i:04d}.mp4"), style, seed))
    for attempt in range(1, 4):
        todo = [j for j in jobs if not Path(j[0]).exists()]
        if not todo or make_clips(todo, workers, attempt):
            break
    else:
        raise RuntimeError("synthetic clip workers kept dying or stalling; run prepare again to resume")
    broken = root / "train" / "real"
    (broken / "broken_empty.mp4").write_bytes(b"")
    good = (broken / "train_real_0000.mp4").read_bytes()
    (broken / "broken_truncated.mp4").write_bytes(good[: len(good) // 3])
