"""GenBuster from the hub as it is today, offline: only the network calls are stood in for (hub.hub_files and
hub.download serve local archives, or a Hugging Face cache is laid out as `hf download` leaves it); verification,
extraction, the manifest, the pinned sets and the frame cache are the real code.

The fixtures mirror the real archives (../shared/REFERENCE.md, "Task and data"): GenBuster-200K-mini.zip (ZIP64, no
top folder, train only, 64-hex names), GenBuster-Bench.zip (top folder GenBuster-Bench/, tracks id / ood / wild, each
real/ + fake/<generator>/) and the 2025 GenBuster-200K-mini.7z (top folder, train / test / benchmark)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import py7zr
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError

from autobuster import dataset, hub, preparation, profiles
from autobuster.errors import UserError
from autobuster.synthetic import write_mp4

ROOT = Path(__file__).resolve().parents[1]
MINI = {"train": {"real": 4, "cogvideox": 2, "easyanimate": 2, "hunyuanvideo": 1, "ltxvideo": 1}}
BENCH = {"id": {"real": 6, "cogvideox": 2, "easyanimate": 2, "hunyuanvideo": 1, "ltxvideo": 1},
         "ood": {"real": 4, "sora": 2, "kling": 2},
         "wild": {"real": 2, "wan2.6": 2}}
OLD = {"train": MINI["train"], "test": {"real": 2, "cogvideox": 1, "ltxvideo": 1},
       "benchmark": {"real": 2, "sora": 1, "pika": 1}}


def clip(path: Path, seed: int) -> None:
    """A distinct 4 s HEVC 10-bit clip at 24 fps (GenBuster's encoding), small and quick to write."""
    frames = np.zeros((97, 64, 64, 3), np.uint8)
    frames[...] = np.random.default_rng(seed).integers(0, 255, 3, dtype=np.uint8)
    frames[..., 1] = (np.arange(97, dtype=np.uint8) * 2)[:, None, None]
    write_mp4(path, frames, 24, hevc10=True)


def tree(root: Path, layout: dict, seed: int) -> Path:
    """<split>/real/<name>.mp4 and <split>/fake/<generator>/<name>.mp4 under root, names 64 hex characters."""
    for split, counts in layout.items():
        for gen, n in counts.items():
            for i in range(n):
                seed += 1
                name = hashlib.sha256(f"{seed}".encode()).hexdigest() + ".mp4"
                clip(root / split / ("real" if gen == "real" else f"fake/{gen}") / name, seed)
    return root


def zip_of(folder: Path, archive: Path, top: str = "") -> Path:
    """A ZIP64 archive of `folder`'s files (stored: mp4 does not compress), optionally under a top folder."""
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                name = (Path(top) / f.relative_to(folder)).as_posix() if top else f.relative_to(folder).as_posix()
                with z.open(name, "w", force_zip64=True) as out:
                    out.write(f.read_bytes())
    return archive


def meta(archive: Path) -> tuple[int, str]:
    return archive.stat().st_size, hashlib.sha256(archive.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("archives")
    mini = zip_of(tree(d / "mini", MINI, 0), d / "GenBuster-200K-mini.zip")
    bench = zip_of(tree(d / "bench", BENCH, 100), d / "GenBuster-Bench.zip", top="GenBuster-Bench")
    old = d / "GenBuster-200K-mini.7z"
    with py7zr.SevenZipFile(old, "w") as z:
        z.writeall(tree(d / "old", OLD, 200), "GenBuster-200K-mini")
    return dict(mini=mini, bench=bench, old=old, bench_tree=d / "bench", old_tree=d / "old")


class Hub:
    """The hub's two dataset repos, served from local archives; `calls` counts what would have been network."""

    def __init__(self, repos: dict[str, list[Path]]):
        self.repos, self.calls = repos, []

    def files(self, src):
        self.calls.append(("files", src.repo))
        return {a.name: meta(a) for a in self.repos[src.repo]} | {"README.md": (24, None)}

    def download(self, src, filename, local_dir):
        self.calls.append(("download", filename))
        local_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(next(a for a in self.repos[src.repo] if a.name == filename), local_dir))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBUSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # empty: nothing cached
    return tmp_path / "home"


def serve(monkeypatch, repos) -> Hub:
    h = Hub(repos)
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(hub, "hub_files", h.files)
    monkeypatch.setattr(hub, "download", h.download)
    return h


def cut_network(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("network call")
    for name in ("hub_files", "download", "model_sizes", "download_model"):
        monkeypatch.setattr(hub, name, refuse)


def model_dir(tmp_path) -> str:
    """A stand-in base model directory: prepare only reads its family from config.json (it loads it at evaluation)."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return str(tmp_path / "model")


def pinned(setup, name) -> tuple[dict, "pd.DataFrame"]:  # noqa: F821
    spec = json.loads(setup.eval_set(name).read_text())
    return spec, dataset.read_manifest(setup).set_index("id").loc[spec["ids"]]


def test_todays_hub_layout_prepares_train_and_three_pinned_sets(archives, home, tmp_path, monkeypatch, capsys):
    h = serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]], hub.BENCH_REPO: [archives["bench"]]})
    setup = preparation.prepare("genbuster", model=model_dir(tmp_path))
    df = dataset.read_manifest(setup)
    assert (df.status == "ok").all() and len(df) == 10 + 12 + 8 + 4
    assert dict(df.split.value_counts()) == {"train": 10, "id": 12, "ood": 8, "wild": 4}
    train = df[df.split == "train"]
    assert set(train.generator) == {"real", "cogvideox", "easyanimate", "hunyuanvideo", "ltxvideo"}
    assert set(df[df.split == "wild"].generator) == {"real", "wan2.6"}  # every generator name is kept
    # val from id, holdout from ood, wild from wild: balanced, and spread over the generators
    for name, split, size in (("val", "id", 12), ("holdout", "ood", 8), ("wild", "wild", 4)):
        spec, rows = pinned(setup, name)
        assert spec["split"] == split and set(rows.split) == {split} and len(rows) == size
        assert (rows.label == "real").sum() == (rows.label == "fake").sum()
        assert np.load(dataset.frame_file(setup, rows.reset_index().iloc[0])).shape[0] == 16  # cached at prepare
    assert dict(pinned(setup, "val")[1].generator.value_counts()) == {
        "real": 6, "cogvideox": 2, "easyanimate": 2, "hunyuanvideo": 1, "ltxvideo": 1}
    out = capsys.readouterr().out
    assert "wild: 4 clips from wild (real 2; fake 2: wan2.6 2)" in out and "holdout: 8 clips from ood" in out
    assert f"{hub.TRAIN_REPO}@{hub.TRAIN_REVISION[:12]}" in pinned(setup, "val")[0]["origin"]
    assert not (home / "genbuster" / "download").exists() or not any((home / "genbuster" / "download").iterdir())
    assert ("download", "GenBuster-200K-mini.zip") in h.calls and profiles.active() == setup

    # a re-run: no network call, the same pinned sets
    cut_network(monkeypatch)
    before = {n: setup.eval_set(n).read_text() for n in dataset.EVAL_SETS}
    assert preparation.prepare("genbuster", model=model_dir(tmp_path)) == setup
    assert {n: setup.eval_set(n).read_text() for n in dataset.EVAL_SETS} == before


def test_two_families_share_one_prepared_dataset(archives, home, tmp_path, monkeypatch):
    """A Qwen3.5 base model after a Qwen2.5-VL one: the same clips and pinned sets, frames cached again only at the
    sizes that differ (multiples of 32, not 28), and fingerprints that keep the two families' scores apart."""
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]], hub.BENCH_REPO: [archives["bench"]]})
    first = preparation.prepare("genbuster", model=model_dir(tmp_path))
    cut_network(monkeypatch)
    (tmp_path / "q35").mkdir()
    (tmp_path / "q35" / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    with pytest.raises(UserError, match="is a Qwen3.5 checkpoint, not Qwen2.5-VL: drop --family"):
        preparation.prepare("genbuster", model=str(tmp_path / "q35"), family="qwen2.5-vl")
    second = preparation.prepare("genbuster", model=str(tmp_path / "q35"))
    assert (second.root, second.family, first.family) == (first.root, "Qwen3.5", "Qwen2.5-VL")
    assert profiles.active() == second
    for name in dataset.EVAL_SETS:
        a, b = dataset.read_eval_set(first, name), dataset.read_eval_set(second, name)
        assert a["ids"] == b["ids"] and a["fingerprint"] != b["fingerprint"]
        assert a["fingerprint"] == json.loads(first.eval_set(name).read_text())["fingerprint"]  # as before formats
        row = pinned(second, name)[1].reset_index().iloc[0]
        old, new = np.load(dataset.frame_file(first, row)), np.load(dataset.frame_file(second, row))
        assert old.shape[1] % 28 == old.shape[2] % 28 == 0 and new.shape[1] % 32 == new.shape[2] % 32 == 0
    square = {"id": "x", "height": 448, "width": 448}  # where the two sizes agree, one file serves both
    assert dataset.frame_file(first, square) == dataset.frame_file(second, square)
    assert dataset.frame_file(first, {**square, "width": 800}) != dataset.frame_file(second, {**square, "width": 800})


def test_verified_archives_are_not_hashed_again(archives, home, tmp_path, monkeypatch):
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]], hub.BENCH_REPO: [archives["bench"]]})
    preparation.prepare("genbuster", model=model_dir(tmp_path), keep_archives=True)
    kept = home / "genbuster" / "download" / f"GenBuster-Bench@{hub.BENCH_REVISION[:12]}" / "GenBuster-Bench.zip"
    assert kept.exists()  # --keep-archives
    shutil.rmtree(home / "genbuster" / "videos" / "GenBuster-Bench")  # say the extraction must run again
    cut_network(monkeypatch)
    monkeypatch.setattr(hub, "sha256", lambda p: pytest.fail("re-hashed"))
    preparation.prepare("genbuster", model=model_dir(tmp_path))
    assert (home / "genbuster" / "videos" / "GenBuster-Bench" / "GenBuster-Bench" / "wild").is_dir()


def hf_cache(cache: Path, repo: str, revision: str, archive: Path) -> Path:
    """The layout `hf download --repo-type dataset` leaves: blobs named by sha256, snapshot links, a ref."""
    d = cache / f"datasets--{repo.replace('/', '--')}"
    digest = meta(archive)[1]
    (d / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(archive, d / "blobs" / digest)
    (d / "snapshots" / revision).mkdir(parents=True)
    os.symlink(f"../../blobs/{digest}", d / "snapshots" / revision / archive.name)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(revision)
    return d / "blobs" / digest


def test_offline_from_the_hugging_face_cache(archives, home, tmp_path, monkeypatch):
    cache = Path(constants.HF_HUB_CACHE)
    hf_cache(cache, hub.TRAIN_REPO, hub.TRAIN_REVISION, archives["mini"])
    blob = hf_cache(cache, hub.BENCH_REPO, hub.BENCH_REVISION, archives["bench"])
    monkeypatch.setattr(hub, "offline", lambda: True)
    cut_network(monkeypatch)
    with pytest.raises(UserError, match="Qwen/Qwen2.5-VL-7B-Instruct is not in the Hugging Face cache"):
        preparation.prepare("genbuster")  # no weights cached: one line naming the model, before any extraction
    assert not (home / "genbuster" / "videos").exists()
    setup = preparation.prepare("genbuster", model=model_dir(tmp_path))
    assert set(dataset.read_manifest(setup).split) == {"train", "id", "ood", "wild"}
    assert blob.exists()  # the user's cache is never deleted from


def test_a_corrupt_archive_in_the_cache_is_refused(archives, home, tmp_path, monkeypatch):
    cache = Path(constants.HF_HUB_CACHE)
    hf_cache(cache, hub.TRAIN_REPO, hub.TRAIN_REVISION, archives["mini"])
    blob = hf_cache(cache, hub.BENCH_REPO, hub.BENCH_REVISION, archives["bench"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    monkeypatch.setattr(hub, "offline", lambda: True)
    with pytest.raises(UserError, match="corrupt"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))
    assert not (home / "genbuster" / "videos" / "GenBuster-Bench").exists()


def test_offline_with_nothing_here_says_what_to_fetch(home, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "offline", lambda: True)
    cut_network(monkeypatch)
    with pytest.raises(UserError, match=f"hf download {hub.TRAIN_REPO} --repo-type dataset --revision"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))


def test_the_2025_release_from_the_hub_and_from_a_folder(archives, home, tmp_path, monkeypatch):
    old_rev = "0" * 40
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["old"]]})  # the Bench is never asked for
    setup = preparation.prepare("genbuster", model=model_dir(tmp_path), train_revision=old_rev)
    df = dataset.read_manifest(setup)
    assert dict(df.split.value_counts()) == {"train": 10, "test": 4, "benchmark": 4}
    assert pinned(setup, "val")[0]["split"] == "test" and pinned(setup, "holdout")[0]["split"] == "benchmark"
    assert not setup.eval_set("wild").exists()
    with pytest.raises(UserError, match="revision 000000000000"):  # another revision needs another home
        preparation.prepare("genbuster", model=model_dir(tmp_path))

    local = preparation.prepare("genbuster", dataset_dir=str(archives["old_tree"]), model=model_dir(tmp_path))
    assert dict(dataset.read_manifest(local).split.value_counts()) == {"train": 10, "test": 4, "benchmark": 4}


def evil_zip(path: Path, name: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train/real/ok.mp4", b"x")
        z.writestr(name, b"escaped")
    return path


@pytest.mark.parametrize("name", ["../escaped.txt", "train/../../escaped.txt", "/tmp/escaped-abs.txt"])
def test_zip_extraction_refuses_paths_outside_the_target(tmp_path, name):
    with pytest.raises(UserError, match="unsafe"):
        hub.extract(evil_zip(tmp_path / "evil.zip", name), tmp_path / "out" / "x")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()


def test_7z_extraction_refuses_paths_outside_the_target(tmp_path):
    evil = tmp_path / "evil.7z"
    (tmp_path / "x.txt").write_text("x")
    with py7zr.SevenZipFile(evil, "w") as z:
        z.write(tmp_path / "x.txt", "../escaped.txt")
    with pytest.raises(UserError, match="unsafe"):
        hub.extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_an_interrupted_extraction_never_looks_finished(archives, home, tmp_path, monkeypatch):
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]], hub.BENCH_REPO: [archives["bench"]]})
    real = hub.extract

    def killed(archive, target):
        real(archive, target)
        if "Bench" in archive.name:
            raise KeyboardInterrupt  # after the files are out, before the folder is renamed into place
    monkeypatch.setattr(hub, "extract", killed)
    with pytest.raises(KeyboardInterrupt):
        preparation.prepare("genbuster", model=model_dir(tmp_path))
    assert not (home / "genbuster" / "videos" / "GenBuster-Bench").exists()
    monkeypatch.setattr(hub, "extract", real)
    setup = preparation.prepare("genbuster", model=model_dir(tmp_path))
    assert (dataset.read_manifest(setup).split == "wild").sum() == 4


def training_clip(mini: Path) -> str:
    with zipfile.ZipFile(mini) as z:
        return next(n for n in z.namelist() if n.startswith("train/real/"))


def test_a_clip_in_two_splits_is_refused(archives, home, tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    shutil.copytree(archives["bench_tree"], bench)
    with zipfile.ZipFile(archives["mini"]) as z:  # a training clip again in the Bench, under another name
        (bench / "id" / "real" / "renamed.mp4").write_bytes(z.read(training_clip(archives["mini"])))
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]],
                        hub.BENCH_REPO: [zip_of(bench, tmp_path / "GenBuster-Bench.zip", top="GenBuster-Bench")]})
    with pytest.raises(UserError, match=r"also in an evaluation split, e\.g\. .* \(train\) and .*renamed\.mp4 \(id\) "
                                        "have the same content"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))


def test_a_file_name_in_two_splits_is_refused(archives, home, tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    shutil.copytree(archives["bench_tree"], bench)
    name = Path(training_clip(archives["mini"])).name
    clip(bench / "ood" / "fake" / "sora" / name, 999)  # another clip under a training clip's name
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]],
                        hub.BENCH_REPO: [zip_of(bench, tmp_path / "GenBuster-Bench.zip", top="GenBuster-Bench")]})
    with pytest.raises(UserError, match=r"\(train\) and .* \(ood\) have the same name"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))


def test_an_empty_track_stops_prepare(archives, home, tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    shutil.copytree(archives["bench_tree"], bench)
    for f in (bench / "wild").rglob("*.mp4"):
        f.write_bytes(b"")  # every clip of the track unusable
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]],
                        hub.BENCH_REPO: [zip_of(bench, tmp_path / "GenBuster-Bench.zip", top="GenBuster-Bench")]})
    with pytest.raises(UserError, match="cannot pin the wild set: the wild split has 0 usable real and 0 usable fake"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))


def test_a_track_of_fakes_only_takes_its_reals_from_id(archives, home, tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    shutil.copytree(archives["bench_tree"], bench)
    shutil.rmtree(bench / "wild" / "real")
    tree(bench, {"id": {"real": 2}}, 500)  # id holds more real clips than val takes
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]],
                        hub.BENCH_REPO: [zip_of(bench, tmp_path / "GenBuster-Bench.zip", top="GenBuster-Bench")]})
    setup = preparation.prepare("genbuster", model=model_dir(tmp_path))
    spec, rows = pinned(setup, "wild")
    assert spec["real_from"] == "id" and sorted(rows.split) == ["id", "id", "wild", "wild"]
    assert not set(spec["ids"]) & set(pinned(setup, "val")[0]["ids"])  # never a clip of another pinned set


def test_hub_errors_are_one_line(home, tmp_path, monkeypatch):
    serve(monkeypatch, {})
    gated = GatedRepoError("401 Client Error", response=SimpleNamespace(headers={}, status_code=401, request=None))
    for error, message in ((Exception(""), "Exception"), (gated, "HF_TOKEN")):
        monkeypatch.setattr(hub, "hub_files", lambda src, e=error: (_ for _ in ()).throw(e))
        with pytest.raises(UserError, match=message) as got:
            preparation.prepare("genbuster", model=model_dir(tmp_path))
        assert "\n" not in str(got.value) and "huggingface.co/datasets/l8cv/GenBuster-200K-mini" in str(got.value)
    gated = str(got.value)
    assert "accept its terms" in gated and "HF_TOKEN" in gated


def test_not_enough_disk_stops_before_downloading(archives, home, tmp_path, monkeypatch):
    h = serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]], hub.BENCH_REPO: [archives["bench"]]})
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(UserError, match=r"not enough disk space in .*home.*: this prepare needs .* GB \(archives"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))
    assert not [c for c in h.calls if c[0] == "download"]


def test_wild_is_scored_by_evaluate(archives, tiny_home, tmp_path):
    """evaluate.py --split wild on the Bench's layout (tiny profile: CPU, the tiny model)."""
    env = {**os.environ, "AUTOBUSTER_HOME": str(tmp_path / "home")}
    model = str(Path(tiny_home) / "tiny" / "model-qwen2.5-vl")
    r = subprocess.run([sys.executable, "prepare.py", "--profile", "tiny", "--dataset", str(archives["bench_tree"]),
                        "--model", model], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "wild: 4 clips from wild (real 2; fake 2: wan2.6 2)" in r.stdout
    r = subprocess.run([sys.executable, "evaluate.py", "--split", "wild", "--out", str(tmp_path / "ev")], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["split"] == "wild" and m["n"] == 4 and set(m["per_generator"]) == {"real", "wan2.6"}
    assert r.stdout.splitlines()[-2].startswith("f1:")


def test_an_interrupted_download_resumes_with_what_is_missing(archives, home, tmp_path, monkeypatch):
    """A repo of two archives, the second download cut off: the re-run fetches only that one."""
    with zipfile.ZipFile(archives["mini"]) as z:
        names = z.namelist()
        for part, keep in (("real", lambda n: "/real/" in n), ("fake", lambda n: "/fake/" in n)):
            with zipfile.ZipFile(tmp_path / f"GenBuster-200K-mini-{part}.zip", "w") as out:
                for n in filter(keep, names):
                    out.writestr(n, z.read(n))
    parts = [tmp_path / "GenBuster-200K-mini-fake.zip", tmp_path / "GenBuster-200K-mini-real.zip"]
    h = serve(monkeypatch, {hub.TRAIN_REPO: parts, hub.BENCH_REPO: [archives["bench"]]})
    fetch = h.download

    def cut(src, filename, local_dir):
        if filename.endswith("real.zip"):
            raise ConnectionError("connection reset")
        return fetch(src, filename, local_dir)
    monkeypatch.setattr(hub, "download", cut)
    with pytest.raises(UserError, match="connection reset"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))
    monkeypatch.setattr(hub, "download", fetch)
    h.calls.clear()
    setup = preparation.prepare("genbuster", model=model_dir(tmp_path))
    assert [c for c in h.calls if c[0] == "download"] == [("download", "GenBuster-200K-mini-real.zip"),
                                                          ("download", "GenBuster-Bench.zip")]
    assert (dataset.read_manifest(setup).split == "train").sum() == 10


@pytest.mark.parametrize("online", [True, False])
def test_an_archive_put_here_by_hand_is_checked(archives, home, tmp_path, monkeypatch, online):
    """Online its sha256 is asked of the hub; offline the zip's own CRCs catch the damage."""
    data = bytearray(archives["bench"].read_bytes())
    at = data.index(b"ftyp") + 200  # inside the first clip
    data[at] ^= 0xFF
    for src, blob in ((hub.Source(hub.TRAIN_REPO, hub.TRAIN_REVISION), archives["mini"].read_bytes()),
                      (hub.Source(hub.BENCH_REPO, hub.BENCH_REVISION), bytes(data))):
        (src.download_dir(home / "genbuster")).mkdir(parents=True)
        (src.download_dir(home / "genbuster") / f"{src.name}.zip").write_bytes(blob)
    if online:
        h = serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]], hub.BENCH_REPO: [archives["bench"]]})
    else:
        monkeypatch.setattr(hub, "offline", lambda: True)
        cut_network(monkeypatch)
    with pytest.raises(UserError, match="GenBuster-Bench.zip is corrupt"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))
    if online:
        assert ("files", hub.BENCH_REPO) in h.calls and not [c for c in h.calls if c[0] == "download"]


def test_a_manifest_of_another_layout_is_refused(archives, home, tmp_path, monkeypatch):
    """A home prepared by the older code (paths relative to another folder) gets one line, not a failed run."""
    serve(monkeypatch, {hub.TRAIN_REPO: [archives["mini"]], hub.BENCH_REPO: [archives["bench"]]})
    setup = preparation.prepare("genbuster", model=model_dir(tmp_path))
    df = dataset.read_manifest(setup)
    df["path"] = df.path.str.replace("GenBuster-200K-mini/", "", regex=False)
    dataset.write_manifest(df, setup)
    with pytest.raises(UserError, match="clips of .*manifest.parquet are not under"):
        preparation.prepare("genbuster", model=model_dir(tmp_path))


def test_split_folders_may_reuse_plain_names(tmp_path, monkeypatch):
    """Only names that are content hashes identify a clip: per-split numbering (0001.mp4) is no duplicate."""
    tree(tmp_path / "mine", {"train": {"real": 1, "gen": 1}, "test": {"real": 1, "gen": 1}}, 700)
    for f in (tmp_path / "mine").rglob("*.mp4"):
        f.rename(f.with_name("0001.mp4"))
    setup = profiles.Setup("tiny", str(tmp_path / "x"), str(tmp_path / "mine"), "")
    Path(setup.root).mkdir()
    df = dataset.build_manifest(dataset.resolve_source(tmp_path / "mine"), setup)
    assert sorted(df.split) == ["test", "test", "train", "train"] and (df.status == "ok").all()


def test_a_moved_home_still_finds_its_data(tmp_path, monkeypatch):
    """active.json stores paths inside $AUTOBUSTER_HOME relative to it, hub ids and outside paths as they are."""
    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.setenv("AUTOBUSTER_HOME", str(old))
    profiles.save_active(profiles.Setup("tiny", str(old / "tiny"), "/data/videos", "Qwen/Qwen2.5-VL-7B-Instruct"))
    old.rename(new)
    monkeypatch.setenv("AUTOBUSTER_HOME", str(new))
    s = profiles.active()
    assert (s.root, s.source, s.model) == (str(new.resolve() / "tiny"), "/data/videos", "Qwen/Qwen2.5-VL-7B-Instruct")
