"""What clips exist and where their frames come from: the manifest, the pinned evaluation sets, the frame
cache, the GenBuster download, custom folders, and the background loader that feeds training."""
import hashlib
import json
import os
import queue
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .errors import UserError
from .profiles import FRAMES, GENBUSTER_REPO, SAMPLE_FPS, Setup
from .video import BadVideo, decode_clip, probe, sample_indices

SPLITS = ("train", "test", "benchmark")
EVAL_SOURCES = {"val": "test", "holdout": "benchmark"}  # pinned set -> split it is drawn from
EVAL_SEED = 1234
COLUMNS = ["id", "path", "split", "label", "generator", "fps", "frames", "width", "height", "duration", "status"]


def workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


# ---------------------------------------------------------------- finding clips


def _label_dirs(split_dir: Path):
    """(label, generator, file) for `real/*` and `fake/<generator>/*` (or `fake/*`) under one split folder."""
    for f in sorted((split_dir / "real").rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            yield "real", "real", f
    fake = split_dir / "fake"
    for f in sorted(fake.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            rel = f.relative_to(fake).parts
            yield "fake", rel[0] if len(rel) > 1 else "fake", f


def resolve_source(folder: Path) -> Path:
    """The folder whose layout scan() reads: `real/` + `fake/`, or train/test/benchmark splits of them
    (GenBuster's archive may nest the splits one level down)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: point --dataset at a folder with real/ and fake/ inside")
    for cand in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (cand / "real").is_dir() or (cand / "fake").is_dir():
            return cand
        if any((cand / s / "real").is_dir() or (cand / s / "fake").is_dir() for s in SPLITS):
            return cand
    raise UserError(f"{folder} has neither real/ and fake/ folders nor <split>/real, <split>/fake "
                    f"(splits: {', '.join(SPLITS)}); put real clips in real/ and generated ones in fake/")


def scan(root: Path) -> list[dict]:
    """Rows for every file of a split layout, or of a plain `real/` + `fake/` folder split 80/20 by path hash."""
    rows = []
    if (root / "real").is_dir() or (root / "fake").is_dir():
        if not ((root / "real").is_dir() and (root / "fake").is_dir()):
            raise UserError(f"{root} needs both a real/ and a fake/ folder (fake/<generator>/ optional)")
        for label, gen, f in _label_dirs(root):
            rel = f.relative_to(root).as_posix()
            bucket = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 5  # stable under additions
            rows.append(dict(path=rel, split="test" if bucket == 0 else "train", label=label, generator=gen))
    else:
        for split in SPLITS:
            for label, gen, f in _label_dirs(root / split):
                rows.append(dict(path=f.relative_to(root).as_posix(), split=split, label=label, generator=gen))
    if not rows:
        raise UserError(f"no files found under {root}")
    for r in rows:
        r["id"] = str(Path(r["path"]).with_suffix(""))
    return rows


def _probe_row(row: dict, root: Path) -> dict:
    try:
        info = probe(root / row["path"])
    except BadVideo as e:
        return {**row, "fps": 0.0, "frames": 0, "width": 0, "height": 0, "duration": 0.0, "status": str(e)}
    need = sample_indices(info.fps)[-1] + 1
    status = "ok" if info.frames >= need else (
        f"too short: {info.frames} frames at {info.fps:g} fps, need {need} for {FRAMES} at {SAMPLE_FPS:g} fps")
    return {**row, **vars(info), "status": status}


def build_manifest(source: Path, setup: Setup) -> pd.DataFrame:
    """Probe every file (in parallel) and write manifest.parquet; clips that cannot be used are kept with why."""
    rows = scan(source)
    with ThreadPoolExecutor(workers()) as pool:
        rows = list(tqdm(pool.map(lambda r: _probe_row(r, source), rows), total=len(rows), desc="probing clips"))
    df = pd.DataFrame(rows)[COLUMNS]
    if df["id"].duplicated().any():
        raise UserError(f"two files map to the same id (same name, different extension) under {source}")
    write_manifest(df, setup)
    return df


def write_manifest(df: pd.DataFrame, setup: Setup) -> None:
    tmp = setup.manifest.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(setup.manifest)


def read_manifest(setup: Setup) -> pd.DataFrame:
    if not setup.manifest.exists():
        raise UserError(f"no manifest at {setup.manifest}: run `uv run prepare.py` first")
    return pd.read_parquet(setup.manifest)


def report_skipped(df: pd.DataFrame) -> str:
    bad = df[df.status != "ok"]
    if bad.empty:
        return f"{len(df)} clips, all usable"
    lines = [f"{len(df)} clips, {len(bad)} skipped:"]
    lines += [f"  {r.path}: {r.status}" for r in bad.head(10).itertuples()]
    if len(bad) > 10:
        lines.append(f"  ... and {len(bad) - 10} more (see the status column of the manifest)")
    return "\n".join(lines)


# ---------------------------------------------------------------- frame cache


def frame_file(setup: Setup, clip_id: str) -> Path:
    return setup.frames / f"{clip_id}.npy"


def load_frames(setup: Setup, row) -> np.ndarray:
    """Cached frames when present, else decoded now (the same decoder and resize as the cache)."""
    f = frame_file(setup, row["id"])
    if f.exists():
        return np.load(f)
    return decode_clip(setup.videos / row["path"], setup.settings.pixel_cap)


def _cache_one(setup: Setup, row) -> str:
    f = frame_file(setup, row["id"])
    if f.exists():
        return "ok"
    try:
        frames = decode_clip(setup.videos / row["path"], setup.settings.pixel_cap)
    except BadVideo as e:
        return str(e)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npy")
    np.save(tmp, frames)
    tmp.replace(f)  # a half-written file never looks cached
    return "ok"


def cache_frames(setup: Setup, df: pd.DataFrame, ids, desc: str) -> dict[str, str]:
    """Decode clips into the lossless uint8 cache, in parallel and resumably; returns id -> status."""
    rows = df.set_index("id", drop=False).loc[list(ids)].to_dict("records")
    with ThreadPoolExecutor(workers()) as pool:
        status = list(tqdm(pool.map(lambda r: _cache_one(setup, r), rows), total=len(rows), desc=desc))
    return {r["id"]: s for r, s in zip(rows, status)}


# ---------------------------------------------------------------- pinned evaluation sets


def _strata(df: pd.DataFrame, n: int, seed: int) -> list[tuple[list[str], int]]:
    """(shuffled candidate ids, how many to take) per stratum: half real, half fake split evenly by generator."""
    rng = random.Random(seed)
    real = sorted(df[df.label == "real"].id)
    gens = sorted(df[df.label == "fake"].generator.unique())
    out = [(real, n // 2)]
    for i, g in enumerate(gens):
        out.append((sorted(df[(df.label == "fake") & (df.generator == g)].id),
                    (n - n // 2) // len(gens) + (i < (n - n // 2) % len(gens))))
    for ids, _ in out:
        rng.shuffle(ids)
    return out


def make_eval_set(setup: Setup, df: pd.DataFrame, name: str, n: int) -> dict | None:
    """Pin `name` once: balanced, stratified by generator, fixed seed, only clips whose frames decode; cached."""
    path = setup.eval_set(name)
    if path.exists():
        return json.loads(path.read_text())
    pool = df[(df.split == EVAL_SOURCES[name]) & (df.status == "ok")]
    if pool.empty:
        return None
    chosen = []
    for ids, k in _strata(pool, n, EVAL_SEED):
        got, pos = [], 0
        while len(got) < k and pos < len(ids):  # replace clips that fail to decode with the next candidates
            batch = ids[pos:pos + k - len(got)]
            pos += len(batch)
            status = cache_frames(setup, df, batch, f"{name} frames")
            for cid, s in status.items():
                if s == "ok":
                    got.append(cid)
                else:
                    df.loc[df.id == cid, "status"] = s
        chosen += got
    write_manifest(df, setup)
    chosen.sort()
    spec = dict(name=name, ids=chosen, pixel_cap=setup.settings.pixel_cap, frames=FRAMES, fps=SAMPLE_FPS,
                seed=EVAL_SEED)
    spec["fingerprint"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    return spec


def eval_clips(setup: Setup, split: str, limit: int | None = None) -> tuple[pd.DataFrame, str]:
    """Rows of a pinned set (val, holdout) or of a whole split (test, benchmark), and the set's fingerprint."""
    df = read_manifest(setup)
    if split in EVAL_SOURCES:
        if not setup.eval_set(split).exists():
            raise UserError(f"this dataset has no pinned {split} set (it needs a {EVAL_SOURCES[split]} split)")
        spec = json.loads(setup.eval_set(split).read_text())
        rows, fp = df.set_index("id", drop=False).loc[spec["ids"]].reset_index(drop=True), spec["fingerprint"]
    elif split in SPLITS:
        rows = df[(df.split == split) & (df.status == "ok")].reset_index(drop=True)
        fp = hashlib.sha256(",".join(rows.id).encode()).hexdigest()[:16]
    else:
        raise UserError(f"unknown split {split!r}: use val, holdout, {', '.join(SPLITS)}")
    if limit:  # the first clips of each label in turn: a short check sees both classes
        rows = rows.iloc[rows.groupby("label").cumcount().argsort(kind="stable")].head(limit).reset_index(drop=True)
    return rows, fp


# ---------------------------------------------------------------- GenBuster download


def hub_files(repo: str) -> dict[str, tuple[int, str | None]]:
    """{file: (size, sha256 or None)} as the hub reports them (a network call)."""
    from huggingface_hub import HfApi
    info = HfApi().dataset_info(repo, files_metadata=True)
    return {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings}


def snapshot(repo: str, local_dir: Path) -> Path:
    """The resumable download itself (a network call)."""
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id=repo, repo_type="dataset", local_dir=local_dir))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def download_genbuster(setup: Setup) -> Path:
    """Download (resumable), verify sizes and hashes against the hub, extract the 7z archive(s); idempotent."""
    try:
        expected = hub_files(GENBUSTER_REPO)
        local = snapshot(GENBUSTER_REPO, setup.path("download"))
    except Exception as e:  # network, auth and hub errors all end here with one line
        raise UserError(f"cannot download {GENBUSTER_REPO}: {str(e).splitlines()[0]} "
                        "(check the network, or set HF_TOKEN if the dataset asks for it)") from None
    archives = sorted(f for f in expected if f.endswith(".7z"))
    if not archives:
        raise UserError(f"{GENBUSTER_REPO} lists no .7z archive; the hub layout changed")
    for name in archives:
        size, digest = expected[name]
        f = local / name
        if not f.exists() or f.stat().st_size != size or (digest and sha256(f) != digest):
            raise UserError(f"{name} is incomplete or corrupt after download: delete {f} and run prepare again")
        extract(f, setup.videos)
    return setup.videos


def extract(archive: Path, target: Path) -> None:
    """Extract with py7zr, refusing any member that would land outside `target`; skipped when already done."""
    import py7zr
    done = target / f".extracted-{archive.name}"
    if done.exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    with py7zr.SevenZipFile(archive) as z:
        for name in z.getnames():
            dest = (target / name).resolve()
            if not dest.is_relative_to(target.resolve()):
                raise UserError(f"{archive.name} holds an unsafe path {name!r}; refusing to extract")
        z.extractall(path=target)
    done.touch()


# ---------------------------------------------------------------- training clips


class TrainClips:
    """Batches of training clips, decoded ahead by background threads. Clips are drawn per generator ("real" for
    the real ones), each in shuffled passes, so a trainer can weigh the generators.

    A clip that fails to decode is skipped and counted in `skipped`; it never stops training."""

    def __init__(self, setup: Setup, seed: int = 0, ahead: int = 32):
        df = read_manifest(setup)
        df = df[(df.split == "train") & (df.status == "ok")]
        self.setup, self.skipped = setup, 0
        self.generators = {lab: sorted(df[df.label == lab].generator.unique()) for lab in ("real", "fake")}
        if not all(self.generators.values()):
            raise UserError("the train split needs both real and fake clips")
        self.rows = {key: d.to_dict("records") for key, d in df.groupby(["label", "generator"])}
        self.rng = random.Random(seed)
        self.pool = ThreadPoolExecutor(max(1, workers() // 2))
        self.ahead = {key: queue.Queue() for key in self.rows}
        self.order = {key: [] for key in self.rows}
        for key in sorted(self.rows):  # half of `ahead` per label, shared by its generators
            for _ in range(max(2, ahead // 2 // len(self.generators[key[0]]))):
                self._submit(key)

    def _next_row(self, key: tuple[str, str]) -> dict:
        if not self.order[key]:  # a fresh shuffled pass over this generator's clips
            self.order[key] = self.rng.sample(self.rows[key], len(self.rows[key]))
        return self.order[key].pop()

    def _submit(self, key: tuple[str, str]) -> None:
        row = self._next_row(key)
        self.ahead[key].put((row, self.pool.submit(load_frames, self.setup, row)))

    def _take(self, key: tuple[str, str]):
        for _ in range(2 * len(self.rows[key])):  # as many draws in a row always hold a whole pass
            row, fut = self.ahead[key].get()
            self._submit(key)
            try:
                return row, fut.result()
            except BadVideo:
                self.skipped += 1
        raise UserError(f"none of the {len(self.rows[key])} train clips of {key[1]} ({key[0]}) decodes: check "
                        f"the videos and run prepare.py again")

    def batch(self, n: int, label: str | None = None, weights: dict[str, float] | None = None):
        """n clips of `label`, or alternating real and fake (n even gives exactly half of each). Each clip's
        generator is drawn with `weights` {generator: weight} over the label's generators, by default in
        proportion to their clips (every clip equally likely)."""
        w = {lab: [weights[g] if weights else len(self.rows[lab, g]) for g in self.generators[lab]]
             for lab in ([label] if label else self.generators)}
        out = []
        for i in range(n):
            lab = label or ("real", "fake")[i % 2]
            out.append(self._take((lab, self.rng.choices(self.generators[lab], w[lab])[0])))
        return out

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
