"""`autobuster demo`: the whole pipeline on the tiny profile, in a scratch copy of the project."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import git

from .preparation import prepare
from .profiles import home

DEMO_BUDGET = 90  # training seconds per demo run (the real tiny budget is 300)
# A scripted worse variant: LoRA starts random with a huge scale, so the model writes garbage.
BROKEN = (("LORA_ALPHA = 32", "LORA_ALPHA = 100000"),
          ("lora_dropout=LORA_DROPOUT,", "lora_dropout=LORA_DROPOUT, init_lora_weights=False,"))
CRASH = ("def main():\n", "def main():\n    raise RuntimeError('scripted crash')\n")


def scratch_copy(project: Path, dest: Path) -> git.Repo:
    """The project's tracked files in a new git repository at `dest`, as a fresh clone would have them."""
    for f in git.Repo(project).git.ls_files().splitlines():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / f, dest / f)
    repo = git.Repo.init(dest, initial_branch="main")
    repo.git.add(A=True)
    repo.index.commit("scratch copy")  # gitpython needs no configured git identity
    return repo


def edit(path: Path, *replacements) -> None:
    text = path.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)


def demo() -> Path:
    t0 = time.time()
    project = Path(__file__).resolve().parents[2]
    scratch = home() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    print(f"== scratch workspace {scratch} (your checkout is not touched)")
    scratch_copy(project, scratch)
    print("== prepare (tiny profile; reused when already prepared)")
    prepare("tiny")

    def cli(*args):
        print(f"$ uv run autobuster {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", "autobuster.cli", *args], cwd=scratch, check=False,
                       env={**os.environ, "GIT_AUTHOR_NAME": "autobuster demo", "GIT_COMMITTER_NAME": "autobuster demo",
                            "GIT_AUTHOR_EMAIL": "demo@localhost", "GIT_COMMITTER_EMAIL": "demo@localhost"})

    train = scratch / "train_dapo.py"
    cli("init", "demo")
    cli("run", "baseline", "--budget", str(DEMO_BUDGET))
    edit(train, *BROKEN)
    cli("run", "random LoRA init at a huge scale (a scripted worse variant)", "--budget", str(DEMO_BUDGET))
    edit(train, CRASH)
    cli("run", "a scripted crash", "--budget", str(DEMO_BUDGET))
    cli("status")
    subprocess.run([sys.executable, "export.py"], cwd=scratch, check=False)
    print(f"== done in {time.time() - t0:.0f}s. Everything is in {scratch}:\n"
          f"   results.tsv, progress.png, runs/ (logs, metrics, predictions, patches), exports/ (the model)")
    print((scratch / "results.tsv").read_text())
    return scratch
