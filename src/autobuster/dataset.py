"""What clips exist and where their frames come from: the manifest, the pinned evaluation sets, the frame
cache, custom folders, and the background loader that feeds training."""
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
from .profiles import FRAMES, SAMPLE_FPS, Setup
from .video import BadVideo, decode_clip, probe, sample_indices, smart_resize

SPLITS = ("train", "test", "benchmark", "id", "ood", "wild")  # 2025 release: train/test/benchmark; Bench: id/ood/wild
# pinned set -> the splits it may be drawn from, the first one present: val from Bench `id` (or the 2025 test split),
# holdout from `ood` (unseen commercial generators; or benchmark), wild from `wild` (in-the-wild generators)
EVAL_SETS = {"val": ("id", "test"), "holdout": ("ood", "benchmark"), "wild": ("wild",)}
EVAL_SEED = 1234
HEAD_BYTES = 1 << 20  # a clip's identity for the split-overlap check: its size and the hash of its first MiB
COLUMNS = ["id", "path", "split", "label", "generator", "fps", "frames", "width", "height", "duration", "bytes",
           "head", "status"]


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


def split_dirs(folder: Path) -> dict[str, Path]:
    """split -> folder for every `<split>/real` or `<split>/fake` in `folder` or up to two levels below it (an
    archive may nest its splits under a top folder, and a prepared home holds one folder per archive)."""
    level, candidates = [folder], [folder]
    for _ in range(2):
        level = [c for d in level for c in sorted(d.iterdir())
                 if c.is_dir() and not c.name.startswith(".") and not c.name.endswith(".part")]
        candidates += level
    found = {}
    for cand in candidates:
        for s in SPLITS:
            d = cand / s
            if (d / "real").is_dir() or (d / "fake").is_dir():
                if s in found:
                    raise UserError(f"two folders hold a {s} split: {found[s]} and {d}; keep one")
                found[s] = d
    return found


def resolve_source(folder: Path) -> Path:
    """The folder whose layout scan() reads: `real/` + `fake/` (here or one level down), or split folders of them
    (train/test/benchmark, id/ood/wild)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: point --dataset at a folder with real/ and fake/ inside")
    if plain(folder) or split_dirs(folder):
        return folder
    for cand in sorted(p for p in folder.iterdir() if p.is_dir()):
        if plain(cand):
            return cand
    raise UserError(f"{folder} has neither real/ and fake/ folders nor <split>/real, <split>/fake "
                    f"(splits: {', '.join(SPLITS)}); put real clips in real/ and generated ones in fake/")


def plain(root: Path) -> bool:
    """A plain `real/` + `fake/` folder, which scan() splits itself (no split folders)."""
    return (root / "real").is_dir() or (root / "fake").is_dir()


def scan(root: Path) -> list[dict]:
    """Rows for every file of a split layout, or of a plain `real/` + `fake/` folder split 80/20 by path hash."""
    rows = []
    if plain(root):
        if not ((root / "real").is_dir() and (root / "fake").is_dir()):
            raise UserError(f"{root} needs both a real/ and a fake/ folder (fake/<generator>/ optional)")
        for label, gen, f in _label_dirs(root):
            rel = f.relative_to(root).as_posix()
            bucket = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 5  # stable under additions
            rows.append(dict(path=rel, split="test" if bucket == 0 else "train", label=label, generator=gen))
    else:
        for split, d in split_dirs(root).items():
            for label, gen, f in _label_dirs(d):
                rows.append(dict(path=f.relative_to(root).as_posix(), split=split, label=label, generator=gen))
    if not rows:
        raise UserError(f"no files found under {root}")
    for r in rows:
        r["id"] = str(Path(r["path"]).with_suffix(""))
    return rows


def _head(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()[:16]


def _probe_row(row: dict, root: Path) -> dict:
    path = root / row["path"]
    try:
        row = {**row, "bytes": path.stat().st_size, "head": _head(path)}
        info = probe(path)
    except (BadVideo, OSError) as e:
        return {"bytes": 0, "head": "", **row, "fps": 0.0, "frames": 0, "width": 0, "height": 0, "duration": 0.0,
                "status": str(e) if isinstance(e, BadVideo) else f"cannot read: {e.strerror or e}"}
    need = sample_indices(info.fps)[-1] + 1
    status = "ok" if info.frames >= need else (
        f"too short: {info.frames} frames at {info.fps:g} fps, need {need} for {FRAMES} at {SAMPLE_FPS:g} fps")
    return {**row, **vars(info), "status": status}


def check_disjoint(df: pd.DataFrame) -> None:
    """Stop when a training clip is also in an evaluation split: the same content (size + hash of the first MiB) or
    the same name where names are content hashes (GenBuster's are 64 hex characters), which also catches a clip
    encoded again. Such a clip inflates every score. Evaluation splits may share clips (no two pinned sets share
    a file)."""
    ok = df[df.status == "ok"].assign(name=lambda d: d.path.map(lambda p: Path(p).stem.lower()))
    train, held = ok[ok.split == "train"], ok[ok.split != "train"]
    hashed = held[held.name.str.fullmatch(r"[0-9a-f]{32,}")]
    for keys, other, what in ((["bytes", "head"], held, "the same content"), (["name"], hashed, "the same name")):
        clash = train.merge(other, on=keys, suffixes=("", "_held"))
        if not clash.empty:
            a = clash.iloc[0]
            raise UserError(f"{len(clash)} training clip(s) are also in an evaluation split, e.g. {a.path} (train) and "
                            f"{a.path_held} ({a.split_held}) have {what}: remove one copy and run prepare again")


def build_manifest(source: Path, setup: Setup) -> pd.DataFrame:
    """Probe every file (in parallel) and write manifest.parquet; clips that cannot be used are kept with why."""
    rows = scan(source)
    with ThreadPoolExecutor(workers()) as pool:
        rows = list(tqdm(pool.map(lambda r: _probe_row(r, source), rows), total=len(rows), desc="probing clips"))
    df = pd.DataFrame(rows)[COLUMNS]
    if df["id"].duplicated().any():
        raise UserError(f"two files map to the same id (same name, different extension) under {source}")
    check_disjoint(df)
    write_manifest(df, setup)
    return df


def write_manifest(df: pd.DataFrame, setup: Setup) -> None:
    tmp = setup.manifest.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(setup.manifest)


def check_paths(df: pd.DataFrame, setup: Setup) -> None:
    """Stop when the manifest's clips are not where it says (a home prepared by an older layout, moved videos)."""
    missing = [p for p in df[df.status == "ok"].path if not (setup.videos / p).exists()]
    if missing:
        raise UserError(f"{len(missing)} clips of {setup.manifest} are not under {setup.videos} (e.g. {missing[0]}): "
                        f"the data was prepared another way; remove {setup.manifest} and {setup.path('eval')} (or use "
                        "a new AUTOBUSTER_HOME) and prepare again")


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


def frame_file(setup: Setup, row) -> Path:
    """A clip's cached frames, keyed by the size the family's resize gives them: where two families' sizes agree
    (448² cap: square clips), they share the file."""
    h, w = smart_resize(int(row["height"]), int(row["width"]), setup.settings.pixel_cap, setup.model_family.factor)
    return setup.path("frames", f"{h}x{w}", f"{row['id']}.npy")


def decode(setup: Setup, row) -> np.ndarray:
    return decode_clip(setup.videos / row["path"], setup.settings.pixel_cap, setup.model_family.factor)


def load_frames(setup: Setup, row) -> np.ndarray:
    """Cached frames when present, else decoded now (the same decoder and resize as the cache)."""
    f = frame_file(setup, row)
    if f.exists():
        return np.load(f)
    return decode(setup, row)


def _cache_one(setup: Setup, row) -> str:
    f = frame_file(setup, row)
    if f.exists():
        return "ok"
    try:
        frames = decode(setup, row)
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


def _strata(real: list[str], fakes: dict[str, list[str]], n: int, seed: int) -> list[tuple[list[str], int]]:
    """(shuffled candidate ids, how many to take) per stratum: as many real as fake clips, up to n // 2 each, the
    fake ones spread evenly over the generators (a generator short of clips leaves its share to the others)."""
    rng = random.Random(seed)
    k = min(n // 2, len(real), sum(map(len, fakes.values())))
    take, left = dict.fromkeys(fakes, 0), k
    while left:
        for g in sorted(fakes):
            if left and take[g] < len(fakes[g]):
                take[g], left = take[g] + 1, left - 1
    out = [(sorted(real), k)] + [(sorted(fakes[g]), take[g]) for g in sorted(fakes)]
    for ids, _ in out:
        rng.shuffle(ids)
    return out


def eval_split(df: pd.DataFrame, name: str) -> str | None:
    """The split the pinned set `name` is drawn from: the first of EVAL_SETS[name] that this dataset has."""
    return next((s for s in EVAL_SETS[name] if (df.split == s).any()), None)


def make_eval_set(setup: Setup, df: pd.DataFrame, name: str, n: int, taken=frozenset(),
                  origin: str = "") -> dict | None:
    """Pin `name` once: balanced, stratified by generator, fixed seed, only clips whose frames decode; cached.
    None when the dataset has no split for it. Clips in `taken` (other pinned sets) are never drawn again; a split
    of fake clips only takes its real half from val's split, as the Bench's ACC_g pairs tracks with `id`'s reals."""
    path = setup.eval_set(name)
    if path.exists():
        spec = json.loads(path.read_text())
        cache_frames(setup, df, spec["ids"], f"{name} frames")  # another family's frame sizes: decoded once here
        return spec
    split = eval_split(df, name)
    if split is None:
        return None
    usable = df[(df.status == "ok") & ~df.id.isin(taken)]
    pool = usable[usable.split == split]
    real_from = split if ((df.split == split) & (df.label == "real")).any() else eval_split(df, "val")
    real = usable[(usable.split == real_from) & (usable.label == "real")]
    fake = pool[pool.label == "fake"]
    if real.empty or fake.empty:
        raise UserError(f"cannot pin the {name} set: the {split} split has {len(real)} usable real and {len(fake)} "
                        f"usable fake clips of {(df.split == split).sum()} files (see the status column of "
                        f"{setup.manifest}); it needs both")
    chosen = []
    for ids, k in _strata(list(real.id), {g: list(d.id) for g, d in fake.groupby("generator")}, n, EVAL_SEED):
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
    spec = dict(name=name, split=split, real_from=real_from, ids=chosen, pixel_cap=setup.settings.pixel_cap,
                frames=FRAMES, fps=SAMPLE_FPS, seed=EVAL_SEED, **({"origin": origin} if origin else {}))
    spec["fingerprint"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=1))
    tmp.replace(path)  # a set is pinned whole or not at all
    return spec


def describe(spec: dict, df: pd.DataFrame) -> str:
    """One line per pinned set: where it comes from, clips per label and generator, fingerprint."""
    rows = df.set_index("id").loc[spec["ids"]]
    fake = rows[rows.label == "fake"].generator.value_counts().sort_index()
    split, real_from = spec.get("split", "?"), spec.get("real_from")
    borrowed = f" from {real_from}" if real_from and real_from != split else ""
    return (f"{spec['name']}: {len(rows)} clips from {split} (real {(rows.label == 'real').sum()}{borrowed}; fake "
            f"{len(rows) - (rows.label == 'real').sum()}: {', '.join(f'{g} {c}' for g, c in fake.items())}), "
            f"fingerprint {spec['fingerprint']}")


def read_eval_set(setup: Setup, name: str) -> dict:
    if not setup.eval_set(name).exists():
        raise UserError(f"this dataset has no pinned {name} set (it is drawn from a {' or '.join(EVAL_SETS[name])} "
                        "split): run `uv run prepare.py` on a dataset that has one")
    spec = json.loads(setup.eval_set(name).read_text())
    return {**spec, "fingerprint": scored_in(setup, spec["fingerprint"])}


def scored_in(setup: Setup, fingerprint: str) -> str:
    """A set's fingerprint as scored in the setup's format: families that share the prepared clips never compare.
    The 2025 format keeps the bare one, which every set was scored in before formats were recorded."""
    fmt = setup.model_family.format.name
    return fingerprint if fmt == "answer" else hashlib.sha256(f"{fingerprint} {fmt}".encode()).hexdigest()[:16]


def eval_clips(setup: Setup, split: str, limit: int | None = None) -> tuple[pd.DataFrame, str]:
    """Rows of a pinned set (val, holdout, wild) or of a whole split (test, ood, ...), and the set's fingerprint."""
    spec = read_eval_set(setup, split) if split in EVAL_SETS else None
    df = read_manifest(setup)
    if spec:
        rows, fp = df.set_index("id", drop=False).loc[spec["ids"]].reset_index(drop=True), spec["fingerprint"]
    elif split in set(df.split):
        rows = df[(df.split == split) & (df.status == "ok")].reset_index(drop=True)
        fp = scored_in(setup, hashlib.sha256(",".join(rows.id).encode()).hexdigest()[:16])
    else:
        raise UserError(f"unknown split {split!r}: use {', '.join(EVAL_SETS)} or a split of this dataset "
                        f"({', '.join(s for s in SPLITS if s in set(df.split))})")
    if limit:  # the first clips of each label in turn: a short check sees both classes
        rows = rows.iloc[rows.groupby("label").cumcount().argsort(kind="stable")].head(limit).reset_index(drop=True)
    return rows, fp


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
