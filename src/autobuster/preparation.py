"""prepare.py's work: get the data and the base model, build the manifest, pin the evaluation sets, fill the frame
cache, and (tiny profile) build and warm-start the tiny model. Every step is idempotent and resumable."""
import re
import time
from pathlib import Path

from huggingface_hub import constants

from . import dataset, hub, synthetic, tiny
from .errors import UserError
from .families import family_of
from .profiles import FRAMES, Setup, get_profile, home, save_active

WARM_START_STEPS = 800  # ~2 minutes on 2 CPU cores


def prepare(profile_name: str = "genbuster", dataset_dir: str | None = None, model: str | None = None,
            keep_archives: bool = False, train_revision: str | None = None,
            bench_revision: str | None = None) -> Setup:
    prof = get_profile(profile_name)
    t0 = time.time()
    base = model or prof.model  # "" for the tiny model, which is built below
    required = ["val"]  # pinned sets this data must yield
    if dataset_dir:
        folder = Path(dataset_dir).expanduser().resolve()
        source = dataset.resolve_source(folder)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name).strip("-") or "dataset"
        root = home() / f"custom-{slug}-{prof.name}"
        fetch_model(base)
    elif prof.name == "tiny":
        fetch_model(base)  # before the synthetic clips: a wrong --model stops at once
        root = home() / "tiny"
        synthetic.build(root / "videos")
        source = root / "videos"
        required.append("holdout")
    else:
        root = home() / "genbuster"
        root.mkdir(parents=True, exist_ok=True)
        source, required = fetch_genbuster(root, prof, base, keep_archives, train_revision or hub.TRAIN_REVISION,
                                           bench_revision or hub.BENCH_REVISION)
    root.mkdir(parents=True, exist_ok=True)
    setup = Setup(prof.name, str(root), str(source), base or str(root / "model"))

    df = dataset.read_manifest(setup) if setup.manifest.exists() else dataset.build_manifest(source, setup)
    dataset.check_paths(df, setup)
    origin = ", ".join(sorted(f"{e['repo']}@{e['revision'][:12]}" for e in hub.read_record(root).values()))
    taken = set()
    for name in dataset.EVAL_SETS:
        spec = dataset.make_eval_set(setup, df, name, getattr(prof, f"{name}_size"), taken, origin)
        if spec:
            taken.update(spec["ids"])
            print(dataset.describe(spec, df))
        elif name in required:
            raise UserError(f"no {name} set: {source} has no {' or '.join(dataset.EVAL_SETS[name])} split "
                            "with real/ and fake/ clips")
        else:
            print(f"{name}: none (no {' or '.join(dataset.EVAL_SETS[name])} split in this dataset)")
    if prof.cache_train:
        train = df[(df.split == "train") & (df.status == "ok")].id
        for cid, status in dataset.cache_frames(setup, df, train, "train frames").items():
            if status != "ok":
                df.loc[df.id == cid, "status"] = status
        dataset.write_manifest(df, setup)
    print(dataset.report_skipped(df))

    if prof.name == "tiny" and not model and not (root / "model" / "model.safetensors").exists():
        build_tiny_model(setup)
    save_active(setup)
    print(f"prepared profile {prof.name} in {time.time() - t0:.0f}s: data {source}, model {setup.model}")
    return setup


def clip_bytes(prof) -> int:
    """Disk per cached clip: 16 uint8 RGB frames at the pixel cap."""
    return FRAMES * prof.pixel_cap * 3


def model_need(base: str) -> list[tuple[Path, int, str]]:
    """The disk the base model still needs (for hub.check_disk); one line now if it cannot be fetched."""
    if not base or hub.cached_model(base):
        return []
    hub.check_fetchable(base)
    try:
        return [(Path(constants.HF_HUB_CACHE), hub.model_sizes(base), "model weights")]
    except Exception as e:  # network, auth and hub errors all end here with one line
        raise hub.hub_error(f"the model {base}", f"https://huggingface.co/{base}", e) from None


def fetch_model(base: str, needs=()) -> None:
    """Check the disk for the model and the rest of `needs` (the data's, from its plans), then fetch the base model
    into the Hugging Face cache now, so that training and evaluation never need the network."""
    if base:
        family_of(hub.model_config(base), base)  # a family autobuster cannot run stops before any download
    hub.check_disk([*needs, *model_need(base)])
    if base:
        print(f"base model {base}: {hub.resolve_model(base)}")


def fetch_genbuster(root: Path, prof, base: str, keep_archives: bool, train_revision: str,
                    bench_revision: str) -> tuple[Path, list[str]]:
    """GenBuster-200K-mini (train) and GenBuster-Bench (id / ood / wild) at their pinned revisions, extracted under
    root/videos; the 2025 release of the mini (one 7z with train / test / benchmark) needs no Bench. Returns the
    videos folder and the pinned sets this data must yield."""
    videos = root / "videos"
    train = hub.plan(hub.Source(hub.TRAIN_REPO, train_revision), root)
    old = (any(a.endswith(".7z") for a in train.archives) if not train.done else
           "test" in dataset.split_dirs(videos / train.src.name))
    plans = [train] if old else [train, hub.plan(hub.Source(hub.BENCH_REPO, bench_revision), root)]
    n_eval = 0 if (root / "eval").exists() else prof.val_size + prof.holdout_size + (0 if old else prof.wild_size)
    needs = [(root, sum(p.bytes_to_fetch() for p in plans), "archives"),
             (root, sum(p.bytes_extracted() for p in plans), "extracted clips"),
             (root, n_eval * clip_bytes(prof), "frame cache")]
    fetch_model(base, needs)  # the plans asked the hub for access first: a gated dataset has stopped already
    for p in plans:
        hub.fetch(p, root, keep_archives)
    return videos, ["val", "holdout"] if old else list(dataset.EVAL_SETS)


def build_tiny_model(setup: Setup) -> None:
    out = Path(setup.model)
    tmp = out.with_name(out.name + ".tmp")
    tiny.build(tmp, setup.settings.pixel_cap)
    clips = dataset.TrainClips(setup, seed=0)
    try:
        tiny.warm_start(tmp, clips, WARM_START_STEPS)
    finally:
        clips.close()
    tmp.replace(out)  # a half-built model never looks ready

