"""One agent per GPU: `autobuster worktrees` and `autobuster status --all` on a scratch copy of the project."""
import json
import time

import git
import pytest

from autobuster import loop
from autobuster.demo import scratch_copy
from test_loop import ROOT, cli

# (status, f1) of the runs each loop records, in order
RUNS = {"w-gpu0": [("keep", 0.5), ("discard", 0.4)], "w-gpu1": [("keep", 0.6), ("keep", 0.7), ("crash", 0.0)]}


@pytest.fixture(scope="module")
def project(tiny_home, tmp_path_factory):
    d = tmp_path_factory.mktemp("agents") / "proj"
    d.mkdir()
    scratch_copy(ROOT, d)
    cli(d, "worktrees", "w", "--gpus", "0,1")
    return d


def test_one_worktree_branch_and_loop_per_gpu(project):
    for gpu in ("0", "1"):
        path = project.parent / f"proj-w-gpu{gpu}"
        assert git.Repo(path).active_branch.name == f"autobuster/w-gpu{gpu}"
        assert (path / "results.tsv").read_text() == loop.HEADER
        assert loop.Workspace(path).env()["CUDA_VISIBLE_DEVICES"] == gpu  # what training and scoring see
    assert git.Repo(project).active_branch.name == "main"


@pytest.mark.parametrize("args,message", [
    (("worktrees", "w", "--gpus", "0,1"), "exists already"),
    (("worktrees", "v", "--gpus", "0,0"), "distinct GPU numbers"),
    (("worktrees", "v", "--gpus", "gpu1"), "distinct GPU numbers"),
    (("run", "x", "--gpus", "two"), "a number of GPUs"),
])
def test_bad_input_gets_one_clear_error(project, args, message):
    cwd = project if args[0] == "worktrees" else project.parent / "proj-w-gpu0"
    r = cli(cwd, *args, check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (project.parent / "proj-v-gpu0").exists()


def test_a_pinned_worktree_refuses_more_gpus(project):
    r = cli(project.parent / "proj-w-gpu1", "run", "x", "--gpus", "2", check=False)
    assert r.returncode == 2 and "pinned to GPU 1" in r.stderr


def test_status_all_merges_every_loop(project):
    for tag, runs in RUNS.items():
        ws = loop.Workspace(project.parent / f"proj-{tag}")
        for i, (status, f1) in enumerate(runs):
            commit = f"{i:x}" * 40  # one commit per run: each is its own configuration
            lock = dict(run_id=f"{i + 1:04d}-{tag}", commit=commit, kept=commit, description=f"{tag} run {i + 1}",
                        started=time.time())
            loop.finish(ws, lock, ws.runs / lock["run_id"], status, dict(f1=f1, accuracy=f1), 1.0, 0.9)
    out = cli(project, "status", "--all", "--json").stdout
    info = json.loads(out[out.index("{"):])
    # round robin: every loop's first run, then every second, ...
    assert [(r["loop"], r["f1"]) for r in info["recent"]] == [
        ("w-gpu0", 0.5), ("w-gpu1", 0.6), ("w-gpu0", 0.4), ("w-gpu1", 0.7), ("w-gpu1", 0.0)]
    assert (info["runs"], info["keeps"], info["discards"], info["crashes"]) == (5, 3, 1, 1)
    assert info["best"]["mean_f1"] == 0.7 and info["best"]["loop"] == "w-gpu1"
    assert (project / "progress-all.png").stat().st_size > 0
    text = cli(project, "status", "--all").stdout
    assert "best: mean f1=0.7000 over 1 seed" in text and "in w-gpu1" in text
