"""prepare.py's work: get the data and the base model, build the manifest, pin the evaluation sets, fill the frame
cache, and (tiny profile) build and warm-start the tiny model. Every step is idempotent and resumable."""
import re
import time
from pathlib import Path

from huggingface_hub import constants

from . import dataset, hub, synthetic, tiny
from .errors import UserError
from .families import QWEN2_5_VL, Family, family_named, family_of
from .profiles import FRAMES, Setup, get_profile, home, save_active

WARM_START_STEPS = 800  # on 2 CPU cores: ~2 minutes for the tiny Qwen2.5-VL, ~7 for the tiny Qwen3.5


def prepare(profile_name: str = "genbuster", dataset_dir: str | None = None, model: str | None = None,
            keep_archives: bool = False, train_revision: str | None = None,
            bench_revision: str | None = None, family: str | None = None) -> Setup:
    prof = get_profile(profile_name)
    t0 = time.time()
    fam = family_named(family) if family else None
    # the tiny profile builds its model below; a hub profile fetches the family's base model
    base = model or ("" if prof.name == "tiny" else (fam or QWEN2_5_VL).default_model)
    required = ["val"]  # pinned sets this data must yield
    if dataset_dir:
        folder = Path(dataset_dir).expanduser().resolve()
        source = dataset.resolve_source(folder)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name).strip("-") or "dataset"
        root = home() / f"custom-{slug}-{prof.name}"
        fam = fetch_model(base, family=fam)
    elif prof.name == "tiny":
        fam = fetch_model(base, family=fam)  # before the synthetic clips: a wrong --model stops at once
        root = home() / "tiny"
        synthetic.build(root / "videos")
        source = root / "videos"
        required.append("holdout")
    else:
        root = home() / "genbuster"
        root.mkdir(parents=True, exist_ok=True)
        source, required, fam = fetch_genbuster(root, prof, base, fam, keep_archives,
                                                train_revision or hub.TRAIN_REVISION,
                                                bench_revision or hub.BENCH_REVISION)
    root.mkdir(parents=True, exist_ok=True)
    setup = Setup(prof.name, str(root), str(source), base or str(root / f"model-{fam.name.lower()}"), fam.name)

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

    if prof.name == "tiny" and not model and not Path(setup.model, "model.safetensors").exists():
        build_tiny_model(setup)
    save_active(setup)
    print(f"prepared profile {prof.name} in {time.time() - t0:.0f}s: data {source}, model {setup.model} "
          f"({fam.name}, {fam.format.name} format)")
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


def fetch_model(base: str, needs=(), family: Family | None = None) -> Family:
    """Check the disk for the model and the rest of `needs` (the data's, from its plans), then fetch the base model
    into the Hugging Face cache now, so that training and evaluation never need the network. Returns the model's
    family (no model: `family`, the tiny model's, Qwen2.5-VL by default)."""
    if not base:
        hub.check_disk(needs)
        return family or QWEN2_5_VL
    found = family_of(hub.model_config(base), base)  # a family autobuster cannot run stops before any download
    if family and found is not family:
        raise UserError(f"{base} is a {found.name} checkpoint, not {family.name}: drop --family or give a "
                        f"{family.name} model")
    hub.check_disk([*needs, *model_need(base)])
    print(f"base model {base}: {hub.resolve_model(base)}")
    return found


def fetch_genbuster(root: Path, prof, base: str, family: Family | None, keep_archives: bool, train_revision: str,
                    bench_revision: str) -> tuple[Path, list[str], Family]:
    """GenBuster-200K-mini (train) and GenBuster-Bench (id / ood / wild) at their pinned revisions, extracted under
    root/videos; the 2025 release of the mini (one 7z with train / test / benchmark) needs no Bench. Returns the
    videos folder, the pinned sets this data must yield and the base model's family."""
    videos = root / "videos"
    train = hub.plan(hub.Source(hub.TRAIN_REPO, train_revision), root)
    old = (any(a.endswith(".7z") for a in train.archives) if not train.done else
           "test" in dataset.split_dirs(videos / train.src.name))
    plans = [train] if old else [train, hub.plan(hub.Source(hub.BENCH_REPO, bench_revision), root)]
    n_eval = 0 if (root / "eval").exists() else prof.val_size + prof.holdout_size + (0 if old else prof.wild_size)
    needs = [(root, sum(p.bytes_to_fetch() for p in plans), "archives"),
             (root, sum(p.bytes_extracted() for p in plans), "extracted clips"),
             (root, n_eval * clip_bytes(prof), "frame cache")]
    # the plans asked the hub for access first: a gated dataset has stopped already
    family = fetch_model(base, needs, family)
    for p in plans:
        hub.fetch(p, root, keep_archives)
    return videos, ["val", "holdout"] if old else list(dataset.EVAL_SETS), family


def build_tiny_model(setup: Setup) -> None:
    out = Path(setup.model)
    tmp = out.with_name(out.name + ".tmp")
    tiny.build(tmp, setup.settings.pixel_cap, setup.model_family)
    clips = dataset.TrainClips(setup, seed=0)
    try:
        tiny.warm_start(tmp, clips, WARM_START_STEPS)
    finally:
        clips.close()
    tmp.replace(out)  # a half-built model never looks ready

