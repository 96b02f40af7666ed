"""The GenBuster download path, offline: only the two network calls are stood in for (a local directory
shaped like the hub snapshot holding a small 7z archive); verification, extraction and preparation are real."""
import hashlib
import json
from pathlib import Path

import numpy as np
import py7zr
import pytest

from autobuster import dataset, preparation, profiles
from autobuster.errors import UserError
from autobuster.synthetic import write_mp4


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub snapshot with GenBuster's layout in one 7z archive; returns the archive path."""
    src = tmp_path / "src" / "GenBuster-200K-mini"
    rng = np.random.default_rng(0)
    for split, gens in (("train", ["gen_a", "gen_b"]), ("test", ["gen_a", "gen_b"]), ("benchmark", ["sora"])):
        for i in range(4):
            write_mp4(src / split / "real" / f"r{i}.mp4", rng.integers(0, 255, (100, 112, 112, 3), np.uint8), 24,
                      hevc10=True)
        for g in gens:
            for i in range(2):
                write_mp4(src / split / "fake" / g / f"f{i}.mp4", rng.integers(0, 255, (100, 112, 112, 3),
                                                                                   np.uint8), 24, hevc10=True)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    archive = snap / "GenBuster-200K-mini.7z"
    with py7zr.SevenZipFile(archive, "w") as z:
        z.writeall(src, "GenBuster-200K-mini")
    (snap / "README.md").write_text("dataset card")
    files = {"GenBuster-200K-mini.7z": (archive.stat().st_size, hashlib.sha256(archive.read_bytes()).hexdigest()),
             "README.md": (12, None)}
    monkeypatch.setattr(dataset, "hub_files", lambda repo: files)
    monkeypatch.setattr(dataset, "snapshot", lambda repo, local_dir: snap)
    monkeypatch.setenv("AUTOBUSTER_HOME", str(tmp_path / "home"))
    return archive


def test_genbuster_download_extract_and_prepare(hub, tmp_path):
    setup = preparation.prepare("genbuster")
    df = dataset.read_manifest(setup)
    assert len(df) == 8 + 8 + 6 and (df.status == "ok").all()
    assert set(df[df.split == "benchmark"].generator) == {"real", "sora"}
    val = json.loads(setup.eval_set("val").read_text())
    assert len(val["ids"]) == 8 and all(i.startswith("test/") for i in val["ids"])
    assert np.load(dataset.frame_file(setup, val["ids"][0])).shape == (16, 112, 112, 3)
    assert profiles.active() == setup
    assert Path(setup.source).is_relative_to(tmp_path / "home")  # extracted under $AUTOBUSTER_HOME, never the cwd
    preparation.prepare("genbuster")  # idempotent: nothing re-extracted, the pinned set unchanged
    assert json.loads(setup.eval_set("val").read_text()) == val


def test_corrupt_download_is_refused(hub):
    hub.write_bytes(hub.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(UserError, match="corrupt"):
        preparation.prepare("genbuster")


def test_extraction_refuses_paths_outside_the_target(tmp_path):
    evil = tmp_path / "evil.7z"
    (tmp_path / "x.txt").write_text("x")
    with py7zr.SevenZipFile(evil, "w") as z:
        z.write(tmp_path / "x.txt", "../escaped.txt")
    with pytest.raises(UserError, match="unsafe"):
        dataset.extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() or (tmp_path / "escaped.txt").read_text() == "x"


def test_a_moved_home_still_finds_its_data(tmp_path, monkeypatch):
    """active.json stores paths inside $AUTOBUSTER_HOME relative to it, hub ids and outside paths as they are."""
    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.setenv("AUTOBUSTER_HOME", str(old))
    profiles.save_active(profiles.Setup("tiny", str(old / "tiny"), "/data/videos", "Qwen/Qwen2.5-VL-7B-Instruct"))
    old.rename(new)
    monkeypatch.setenv("AUTOBUSTER_HOME", str(new))
    s = profiles.active()
    assert (s.root, s.source, s.model) == (str(new.resolve() / "tiny"), "/data/videos", "Qwen/Qwen2.5-VL-7B-Instruct")
