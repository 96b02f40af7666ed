"""Getting GenBuster and the base model from the Hugging Face Hub, once: pinned revisions, archives verified
against the hub's sizes and sha256 (recorded, so a re-run does not hash again), safe and atomic extraction, a
disk check before anything large is fetched, and no network call when everything is already here (an extracted
folder or an archive under $AUTOBUSTER_HOME, or the Hugging Face cache as `hf download` leaves it).

Only `hub_files`, `download`, `model_sizes`, `download_model` and `model_config` (one config.json) talk to the
network; tests stand in for them."""
import hashlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import UserError

# The dataset repos as they are today, pinned (README: `--train-revision` / `--bench-revision` pick others).
TRAIN_REPO, TRAIN_REVISION = "l8cv/GenBuster-200K-mini", "58af00f022d8272f42de3be912e9a905bf6087d2"
BENCH_REPO, BENCH_REVISION = "l8cv/GenBuster-Bench", "68e41ab55726013f1c7455980180114302196c23"
ARCHIVES = (".zip", ".7z")
ARCHIVE_FILES = [f"*{a}" for a in ARCHIVES]
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # config, weights, tokenizer, chat template
RECORD = "sources.json"  # under the dataset root: what was fetched, at which revision, and what was verified


@dataclass(frozen=True)
class Source:
    repo: str
    revision: str

    @property
    def name(self) -> str:  # the folder its archives extract into, under videos/
        return self.repo.split("/")[-1]

    @property
    def page(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}"

    def download_dir(self, root: Path) -> Path:  # per revision: archives of another revision are never mistaken
        return root / "download" / f"{self.name}@{self.revision[:12]}"


def offline() -> bool:
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type when its message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def hub_error(what: str, page: str, e: Exception) -> UserError:
    from huggingface_hub.errors import GatedRepoError
    if isinstance(e, GatedRepoError):
        return UserError(f"{what} is gated: accept its terms on {page} while logged in, then set HF_TOKEN to a "
                         "token of that account and run prepare again")
    return UserError(f"cannot fetch {what}: {first_line(e)} (check the network; if the repo is gated, accept its "
                     f"terms on {page} and set HF_TOKEN)")


# ---------------------------------------------------------------- the network (tests stand in for these)


def hub_files(src: Source) -> dict[str, tuple[int, str | None]]:
    """{file: (size, sha256 or None)} as the hub reports them for the pinned revision. A gated repo's listing is
    public, so access is checked too: a missing acceptance shows before anything is downloaded."""
    from huggingface_hub import HfApi
    HfApi().auth_check(src.repo, repo_type="dataset")
    info = HfApi().dataset_info(src.repo, revision=src.revision, files_metadata=True)
    return {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings}


def download(src: Source, filename: str, local_dir: Path) -> Path:
    """One file of the pinned revision into `local_dir` (resumable)."""
    from huggingface_hub import hf_hub_download
    return Path(hf_hub_download(src.repo, filename, repo_type="dataset", revision=src.revision,
                                local_dir=local_dir))


def model_sizes(model: str) -> int:
    """Bytes of the files `download_model` would fetch."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects
    info = HfApi().model_info(model, files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings}
    return sum(sizes[f] for f in filter_repo_objects(sizes, allow_patterns=MODEL_FILES))


def download_model(model: str) -> Path:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(model, allow_patterns=MODEL_FILES))


# ---------------------------------------------------------------- what is already here


def cached_snapshot(repo: str, revision: str | None = None, repo_type: str = "dataset") -> Path | None:
    """The Hugging Face cache's folder for `repo` at `revision`, if it is there and complete (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
    try:
        # only the files used must be there: a cache filled with `hf download --include "*.zip"` counts
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, local_files_only=True,
                                      allow_patterns=MODEL_FILES if repo_type == "model" else ARCHIVE_FILES))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, HFValidationError):
        return None


def cached_model(model: str) -> Path | None:
    """A local model directory for `model` (a directory, or a hub id in the Hugging Face cache), without network."""
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    snap = cached_snapshot(model, repo_type="model")
    return snap if snap and (snap / "config.json").exists() and any(snap.glob("*.safetensors")) else None


def check_fetchable(model: str) -> None:
    """Raise the one-line reason when `model`, not here, cannot be downloaded either (a path, or offline)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model) or model.startswith("."):
        raise UserError(f"no model directory at {model}: give a local Qwen2.5-VL directory or a hub id such as "
                        "Qwen/Qwen2.5-VL-7B-Instruct")
    if offline():
        raise UserError(f"the base model {model} is not in the Hugging Face cache and the hub is offline "
                        f"(HF_HUB_OFFLINE=1): run `uv run prepare.py` once with network, `hf download {model}`, or "
                        "pass --model with a local Qwen2.5-VL directory")


def model_config(model: str) -> dict:
    """`model`'s config.json: from its directory or the Hugging Face cache, or that one small file from the hub,
    before any weights are fetched."""
    local = cached_model(model)
    if local:
        path = local / "config.json"
        if not path.exists():
            raise UserError(f"no config.json in {local}: give a Hugging Face model directory")
    else:
        check_fetchable(model)
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(model, "config.json")
        except Exception as e:
            raise hub_error(f"the model {model}", f"https://huggingface.co/{model}", e) from None
    return json.loads(Path(path).read_text())


def resolve_model(model: str) -> str:
    """A local directory for `model`: as is, from the Hugging Face cache, or downloaded there now."""
    local = cached_model(model)
    if local:
        return str(local)
    check_fetchable(model)
    try:
        return str(download_model(model))
    except Exception as e:  # network, auth and hub errors all end here with one line
        raise hub_error(f"the model {model}", f"https://huggingface.co/{model}", e) from None


# ---------------------------------------------------------------- archives


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"verifying {path.name}", leave=False) as bar:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _members(archive: Path) -> list[str]:
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            return z.namelist()
    import py7zr
    with py7zr.SevenZipFile(archive) as z:
        return z.getnames()


def extract(archive: Path, target: Path) -> None:
    """Extract a zip (ZIP64 included) or 7z archive into `target`, refusing any member that would land outside it.
    Zip members are CRC-checked as they are read, so a corrupt archive stops here."""
    root = target.resolve()
    try:
        for name in _members(archive):
            if not (target / name).resolve().is_relative_to(root):
                raise UserError(f"{archive.name} holds an unsafe path {name!r}; refusing to extract")
        target.mkdir(parents=True, exist_ok=True)
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                for m in tqdm(z.infolist(), desc=f"extracting {archive.name}", unit="file"):
                    z.extract(m, target)
        else:
            import py7zr
            with py7zr.SevenZipFile(archive) as z:
                z.extractall(path=target)
    except UserError:
        raise
    except OSError as e:  # a full disk or a permission: not the archive's fault
        raise UserError(f"cannot extract {archive.name} into {target}: {e.strerror or first_line(e)} (free "
                        f"{shutil.disk_usage(root.parent).free / 1e9:.1f} GB there)") from None
    except Exception as e:  # a bad CRC, a truncated member, a broken header
        raise UserError(f"{archive} is corrupt ({first_line(e)}): delete it and run prepare again") from None


# ---------------------------------------------------------------- one source: find, check, download, extract


def read_record(root: Path) -> dict:
    f = root / RECORD
    return json.loads(f.read_text()) if f.exists() else {}


def write_record(root: Path, record: dict) -> None:
    tmp = root / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(root / RECORD)


@dataclass
class Plan:
    """What one source still needs: nothing (`done`), archives found here (`local`), or a download (`remote`,
    with the hub's sizes)."""
    src: Source
    done: bool
    local: dict[str, Path]
    remote: dict[str, tuple[int, str | None]]

    @property
    def archives(self) -> list[str]:
        return sorted({**self.local, **self.remote})

    def bytes_to_fetch(self) -> int:
        return sum(size for size, _ in self.remote.values())

    def bytes_extracted(self) -> int:  # videos do not compress: the extracted clips take about the archive's size
        return 0 if self.done else self.bytes_to_fetch() + sum(p.stat().st_size for p in self.local.values())


def _archives_in(folder: Path | None) -> dict[str, Path]:
    return {f.name: f for f in sorted(folder.iterdir()) if f.suffix in ARCHIVES} if folder and folder.is_dir() else {}


def plan(src: Source, root: Path) -> Plan:
    """Where `src` stands, with a network call only when none of its archives is here."""
    record = read_record(root)
    extracted = (root / "videos" / src.name).is_dir()  # extraction renames its folder into place when complete
    if src.name in record and record[src.name]["revision"] != src.revision:
        if extracted:
            raise UserError(f"{root} holds {src.repo} at revision {record[src.name]['revision'][:12]}, not "
                            f"{src.revision[:12]}: set AUTOBUSTER_HOME to another folder for another revision")
        del record[src.name]
        write_record(root, record)
    if extracted:
        return Plan(src, True, {}, {})
    listed = record.get(src.name, {}).get("files")  # the hub's list, once it was asked
    here, cached = _archives_in(src.download_dir(root)), _archives_in(cached_snapshot(src.repo, src.revision))
    local = here or cached
    # the cache knows each archive's sha256 (its blob name); an archive put here by hand is checked against the
    # hub's list, once, where the hub can be asked
    trusted = listed is not None or not here or offline()
    if local and trusted and set(listed or ()) <= set(local):
        return Plan(src, False, local, {})
    if offline():
        raise UserError(f"{src.repo} at revision {src.revision[:12]} is not (all) here and the hub is offline "
                        f"(HF_HUB_OFFLINE=1): run prepare once with network, or `hf download {src.repo} --repo-type "
                        f"dataset --revision {src.revision}` into the Hugging Face cache, or put its archive in "
                        f"{src.download_dir(root)}")
    try:
        files = hub_files(src)
    except Exception as e:  # network, auth and hub errors all end here with one line
        raise hub_error(src.repo, src.page, e) from None
    remote = {f: v for f, v in files.items() if Path(f).suffix in ARCHIVES}
    record.setdefault(src.name, dict(repo=src.repo, revision=src.revision))["files"] = {
        f: list(v) for f, v in remote.items()}
    write_record(root, record)
    if not remote:
        raise UserError(f"{src.repo} at revision {src.revision[:12]} holds no .zip or .7z archive "
                        f"(files: {', '.join(sorted(files)) or 'none'}); the hub layout changed")
    # resume a partial set: what is here already is not fetched again
    return Plan(src, False, {f: p for f, p in local.items() if f in remote}, {f: v for f, v in remote.items()
                                                                            if f not in local})


def _expected(root: Path, src: Source, name: str, path: Path) -> tuple[int | None, str | None]:
    """(size, sha256) to check an archive against: the hub's answer recorded at download, else the Hugging Face
    cache's own record (an LFS file's blob is named by its sha256); (None, None) when neither is known."""
    files = read_record(root).get(src.name, {}).get("files", {})
    if name in files:
        return tuple(files[name])
    blob = Path(os.path.realpath(path)).name
    return (None, blob) if re.fullmatch(r"[0-9a-f]{64}", blob) else (None, None)


def verify(root: Path, src: Source, name: str, path: Path) -> None:
    """Size and sha256 against what the hub said, hashed once: a verified (size, mtime) is recorded."""
    record = read_record(root)
    entry = record.setdefault(src.name, dict(repo=src.repo, revision=src.revision))
    st = path.stat()
    if entry.get("verified", {}).get(name) == [st.st_size, st.st_mtime_ns]:
        return
    size, digest = _expected(root, src, name, path)
    if size is not None and st.st_size != size:
        raise UserError(f"{path} has {st.st_size:,} bytes, the hub says {size:,}: delete it and run prepare again")
    if digest is None:
        print(f"{name}: no sha256 recorded for it; its members' CRCs are checked while extracting")
    elif sha256(path) != digest:
        raise UserError(f"{path} is corrupt (sha256 differs from the hub's): delete it and run prepare again")
    entry.setdefault("verified", {})[name] = [st.st_size, st.st_mtime_ns]
    write_record(root, record)


def fetch(p: Plan, root: Path, keep_archives: bool) -> Path:
    """The source's clips extracted under videos/<name>: downloaded if needed, verified, extracted into a `.part`
    folder renamed into place at the end (an interrupted extraction never looks finished); a downloaded archive is
    deleted afterwards unless `keep_archives`. Archives in the Hugging Face cache are never deleted."""
    out = root / "videos" / p.src.name
    if p.done:
        return out
    local = dict(p.local)
    for name in sorted(p.remote):
        try:
            local[name] = download(p.src, name, p.src.download_dir(root))
        except Exception as e:
            raise hub_error(p.src.repo, p.src.page, e) from None
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    for name, path in sorted(local.items()):
        verify(root, p.src, name, path)
        extract(path, part)
    part.replace(out)
    ours = p.src.download_dir(root)
    if not keep_archives and all(path.parent == ours for path in local.values()):
        shutil.rmtree(ours)
        print(f"{p.src.name}: archives deleted after extraction (--keep-archives keeps them)")
    return out


# ---------------------------------------------------------------- disk


def check_disk(needs: list[tuple[Path, int, str]]) -> None:
    """Stop before fetching when a file system lacks room: `needs` are (folder, bytes, what) triples."""
    by_fs: dict[int, list] = {}
    for folder, size, what in needs:
        if size <= 0:
            continue
        while not folder.exists():
            folder = folder.parent
        by_fs.setdefault(folder.stat().st_dev, []).append((folder, size, what))
    for items in by_fs.values():
        need = sum(size for _, size, _ in items)
        free = shutil.disk_usage(items[0][0]).free
        if need > free:
            parts = ", ".join(f"{what} {size / 1e9:.1f} GB" for _, size, what in items)
            raise UserError(f"not enough disk space in {items[0][0]}: this prepare needs {need / 1e9:.1f} GB "
                            f"({parts}) and {free / 1e9:.1f} GB are free; free some space or set AUTOBUSTER_HOME "
                            "(data) / HF_HOME (model) to a bigger disk")
