"""prepare.py's work: get the data, build the manifest, pin the evaluation sets, fill the frame cache, and
(tiny profile) build and warm-start the tiny model. Every step is idempotent and resumable."""
import re
import time
from pathlib import Path

from . import dataset, synthetic, tiny
from .profiles import Setup, get_profile, home, save_active

WARM_START_STEPS = 800  # ~2 minutes on 2 CPU cores


def prepare(profile_name: str = "genbuster", dataset_dir: str | None = None, model: str | None = None) -> Setup:
    prof = get_profile(profile_name)
    t0 = time.time()
    if dataset_dir:
        folder = Path(dataset_dir).expanduser().resolve()
        source = dataset.resolve_source(folder)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name).strip("-") or "dataset"
        root = home() / f"custom-{slug}-{prof.name}"
    elif prof.name == "tiny":
        root = home() / "tiny"
        synthetic.build(root / "videos")
        source = root / "videos"
    else:
        root = home() / "genbuster"
        root.mkdir(parents=True, exist_ok=True)
        videos = dataset.download_genbuster(Setup(prof.name, str(root), str(root / "videos"), ""))
        source = dataset.resolve_source(videos)
    root.mkdir(parents=True, exist_ok=True)
    setup = Setup(prof.name, str(root), str(source), model or prof.model or str(root / "model"))

    df = dataset.read_manifest(setup) if setup.manifest.exists() else dataset.build_manifest(source, setup)
    for name, n in (("val", prof.val_size), ("holdout", prof.holdout_size)):
        spec = dataset.make_eval_set(setup, df, name, n)
        print(f"{name}: {len(spec['ids'])} clips, fingerprint {spec['fingerprint']}" if spec
              else f"{name}: none (no {dataset.EVAL_SOURCES[name]} split in this dataset)")
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

