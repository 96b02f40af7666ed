"""The autoresearch loop: init, run (commit, train, score apart, keep or discard), status, long runs, and the
repair of an interrupted run. results.tsv and runs/ are append-only; a kept commit is never lost."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import pandas as pd

from . import dataset, metrics
from .errors import UserError
from .profiles import active, home

P_BETTER = 0.8  # keep only when the paired bootstrap says the candidate is better with at least this probability
PLATEAU = 10  # runs without a keep that `status` calls a plateau
OVERRUN = 1.1  # a run that trained past this share of the budget (+ 60 s for its last step) is a crash
SLOW = 0.7  # warn when a run made fewer than this share of the best run's steps
PROGRESS_SECONDS = 30  # the runner prints a `progress:` line this often while training, for an agent tailing it
PROGRESS_STEPS = 20  # the rollout accuracy and format rate it prints are means over this many last steps
ALLOWANCE = {"tiny": 600, "genbuster": 3600}  # seconds for loading + evaluation on top of the training budget
FIXED = ("prepare.py", "evaluate.py", "export.py", "src/autobuster")
HEADER = "commit\tf1\taccuracy\tmemory_gb\tp_better\tstatus\tdescription\n"
TRAIN_FILE = "train_dapo.py"


class Workspace:
    """The git checkout the loop works in, and its harness files (results.tsv, runs/, .autobuster/)."""

    def __init__(self, path: str | Path = "."):
        try:
            self.repo = git.Repo(path, search_parent_directories=True)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise UserError(f"{Path(path).resolve()} is not inside a git checkout of autobuster") from None
        self.root = Path(self.repo.working_tree_dir)
        self.results = self.root / "results.tsv"
        self.runs = self.root / "runs"
        self.state_file = self.root / ".autobuster" / "state.json"
        self.lock = self.root / ".autobuster" / "lock.json"
        self.pin = self.root / ".autobuster" / "cuda_visible_devices"  # written by `autobuster worktrees`

    def env(self, **extra) -> dict:
        """The environment of training and scoring: this worktree's GPU when `autobuster worktrees` pinned one."""
        env = {**os.environ, **extra}
        if self.pin.exists():
            env["CUDA_VISIBLE_DEVICES"] = self.pin.read_text().strip()
        return env

    # ------------------------------------------------------------ state

    def fingerprint(self) -> dict[str, str]:
        files = []
        for name in FIXED:
            p = self.root / name
            files += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []
        return {f.relative_to(self.root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    def state(self) -> dict:
        if not self.state_file.exists():
            raise UserError("no loop here yet: run `uv run autobuster init <tag>` first")
        return json.loads(self.state_file.read_text())

    def rows(self) -> pd.DataFrame:
        if not self.results.exists():
            return pd.DataFrame(columns=HEADER.strip().split("\t"))
        return pd.read_csv(self.results, sep="\t", dtype={"commit": str}, keep_default_na=False)

    def append(self, commit, f1, accuracy, memory_gb, p_better, status, description) -> None:
        """One row, one write, append-only."""
        desc = " ".join(description.split())  # no tabs or newlines inside the field
        line = f"{commit}\t{f1:.6f}\t{accuracy:.6f}\t{memory_gb:.1f}\t{p_better:.3f}\t{status}\t{desc}\n"
        fd = os.open(self.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def loops(self) -> list["Workspace"]:
        """Every worktree of this repository that holds a loop (`autobuster init` or `worktrees` ran there)."""
        paths = [line.split(" ", 1)[1] for line in self.repo.git.worktree("list", "--porcelain").splitlines()
                 if line.startswith("worktree ")]
        return [w for w in (Workspace(p) for p in paths if Path(p).is_dir()) if w.state_file.exists()]

    def records(self) -> list[dict]:
        """Every finished run's run.json, oldest first."""
        return [json.loads(f.read_text()) for f in sorted(self.runs.glob("*/run.json"))]

    def best_kept(self) -> dict | None:
        kept = [r for r in self.records() if r["status"] == "keep"]
        return max(kept, key=lambda r: r["f1"]) if kept else None

    def last_kept_commit(self) -> str:
        kept = [r for r in self.records() if r["status"] == "keep"]
        return kept[-1]["commit_full"] if kept else self.state()["base_commit"]


def _check_new(ws: Workspace, tag: str) -> str:
    """The branch of a new loop `tag`, which must not exist yet, from a committed train_dapo.py."""
    branch = f"autobuster/{tag}"
    if branch in [h.name for h in ws.repo.heads]:
        raise UserError(f"branch {branch} exists already: pick another tag")
    if ws.repo.is_dirty(path=TRAIN_FILE):
        raise UserError(f"{TRAIN_FILE} has uncommitted changes: commit or stash them before starting a loop")
    return branch


def init(tag: str, ws: Workspace | None = None) -> None:
    ws = ws or Workspace()
    branch = _check_new(ws, tag)
    setup = active()
    val = dataset.read_eval_set(setup, "val")
    ws.repo.create_head(branch).checkout()
    ws.state_file.parent.mkdir(exist_ok=True)
    (ws.state_file.parent / ".gitignore").write_text("*\n")
    ws.state_file.write_text(json.dumps(dict(tag=tag, branch=branch, base_commit=ws.repo.head.commit.hexsha,
                                             fixed=ws.fingerprint(), val_fingerprint=val["fingerprint"],
                                             profile=setup.profile), indent=1))
    if not ws.results.exists():
        ws.results.write_text(HEADER)
    print(f"on branch {branch}; val set {val['fingerprint']} ({len(val['ids'])} clips, profile {setup.profile}); "
          f"next: uv run autobuster run \"baseline\"")


def worktrees(tag: str, gpus: str, ws: Workspace | None = None) -> list[Path]:
    """One agent per GPU: for each GPU i a git worktree ../<repo>-<tag>-gpu<i> with its own loop (branch
    autobuster/<tag>-gpu<i>, results.tsv, runs/), whose runs see GPU i alone."""
    ws = ws or Workspace()
    ids = [g.strip() for g in gpus.split(",")]
    if not all(g.isdigit() for g in ids) or len(set(ids)) < len(ids):
        raise UserError(f"--gpus {gpus!r}: give distinct GPU numbers separated by commas, e.g. --gpus 0,1,2,3")
    plan = [(g, f"{tag}-gpu{g}", ws.root.parent / f"{ws.root.name}-{tag}-gpu{g}") for g in ids]
    for _, name, path in plan:  # every check before the first worktree is made
        _check_new(ws, name)
        if path.exists():
            raise UserError(f"{path} exists already: pick another tag or remove it")
    for gpu, name, path in plan:
        ws.repo.git.worktree("add", "--detach", str(path))
        w = Workspace(path)
        init(name, w)
        w.pin.write_text(gpu + "\n")
        print(f"  {path}: GPU {gpu}")
    print("start one agent in each worktree; follow them all with `uv run autobuster status --all`")
    return [path for *_, path in plan]


def check_fixed(ws: Workspace, state: dict) -> None:
    now = ws.fingerprint()
    changed = sorted(f for f in set(now) | set(state["fixed"]) if now.get(f) != state["fixed"].get(f))
    if changed:
        raise UserError("fixed files changed since init (only train_dapo.py may change): " + ", ".join(changed)
                        + "; restore them with `git checkout -- <file>`")


def recover(ws: Workspace) -> None:
    """A runner that died mid-run left its lock: record that run as a crash and restore the kept state."""
    if not ws.lock.exists():
        return
    lock = json.loads(ws.lock.read_text())
    try:
        os.kill(lock["pid"], 0)
        raise UserError(f"run {lock['run_id']} is still in progress (pid {lock['pid']}); wait for it or kill it")
    except ProcessLookupError:
        pass
    except PermissionError:
        raise UserError(f"run {lock['run_id']} is still in progress (pid {lock['pid']})") from None
    if lock.get("child"):
        try:
            os.killpg(lock["child"], signal.SIGKILL)  # a training process the dead runner left behind
        except (ProcessLookupError, PermissionError):
            pass
    run_dir = ws.runs / lock["run_id"]
    finish(ws, lock, run_dir, "crash", {}, 0.0, 0.0, "interrupted (runner killed)")
    print(f"recovered run {lock['run_id']}: recorded as crash, branch back at {lock['kept'][:7]}")


def finish(ws, lock, run_dir, status, m, memory_gb, p_better, note="", steps=0):
    """Record the run (run.json, results.tsv), and on discard or crash save the patch and reset the branch."""
    commit = lock["commit"]
    run_dir.mkdir(parents=True, exist_ok=True)
    if status in ("discard", "crash") and commit != lock["kept"]:
        (run_dir / "patch.diff").write_text(ws.repo.git.diff(lock["kept"], commit, "--", TRAIN_FILE) + "\n")
        ws.repo.git.reset("--hard", lock["kept"])
    if status in ("discard", "crash"):
        adapter = run_dir / "adapter"
        if adapter.exists():
            import shutil
            shutil.rmtree(adapter)
    record = dict(run_id=lock["run_id"], commit=commit[:7], commit_full=commit, status=status,
                  f1=m.get("f1", 0.0), accuracy=m.get("accuracy", 0.0), memory_gb=memory_gb, p_better=p_better,
                  description=lock["description"], note=note, steps=steps,
                  seconds=round(time.time() - lock["started"], 1))
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    ws.append(commit[:7], record["f1"], record["accuracy"], memory_gb, p_better, status, lock["description"])
    ws.lock.unlink(missing_ok=True)
    return record


def _commit(ws: Workspace, description: str, first: bool) -> str:
    ws.repo.index.add([TRAIN_FILE])
    if not ws.repo.index.diff("HEAD"):
        if not first:
            raise UserError(f"{TRAIN_FILE} is unchanged since the last kept run: make one change, then run")
        return ws.repo.head.commit.hexsha  # the baseline may run the file as it is
    return ws.repo.index.commit(description).hexsha


def processes(gpus: str | None, ws: Workspace) -> int:
    """How many GPUs (training processes) a run uses: --gpus, else $AUTOBUSTER_GPUS, else 1; `all` = every visible
    GPU. More than 1 without a GPU runs that many CPU processes (gloo), as the tests do."""
    value = str(gpus or os.environ.get("AUTOBUSTER_GPUS") or 1).strip()
    if value != "all" and not (value.isdigit() and int(value) > 0):
        raise UserError(f"--gpus / AUTOBUSTER_GPUS is {value!r}: give a number of GPUs (1, 2, ...) or `all`")
    if value == "1":
        return 1
    import torch
    pinned = ws.env().get("CUDA_VISIBLE_DEVICES")
    visible = len(pinned.split(",")) if ws.pin.exists() else torch.cuda.device_count()
    if value == "all":
        return max(visible, 1)
    if visible and int(value) > visible:
        raise UserError(f"--gpus {value}: only {visible} GPU(s) visible here" + (
            f" (this worktree is pinned to GPU {pinned} by `autobuster worktrees`)" if ws.pin.exists() else "")
            + f"; use --gpus {visible} or fewer")
    return int(value)


def parse_summary(text: str) -> dict[str, float]:
    """The numbers of train_dapo.py's summary block (the `key: value` lines after `---`)."""
    block = text.rsplit("\n---\n", 1)[1] if "\n---\n" in text else ""
    pairs = [line.split(":", 1) for line in block.splitlines() if ":" in line]
    out = {}
    for key, value in pairs:
        try:
            out[key.strip()] = float(value)
        except ValueError:
            pass
    return out


def progress(run_dir: Path, seconds: int, wall: float) -> str:
    """One line on a run in progress, from its train.jsonl: the last step, training seconds of the budget, and the
    rollout accuracy and format rate of the last PROGRESS_STEPS steps."""
    steps = []
    log = run_dir / "train.jsonl"
    for line in (log.read_text(errors="replace").splitlines() if log.exists() else []):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "accuracy" in rec:
            steps.append(rec)
    if not steps:
        return f"progress: loading, no step yet ({wall:.0f}s since start)"
    last = steps[-PROGRESS_STEPS:]
    acc, fmt = (sum(r[key] for r in last) / len(last) for key in ("accuracy", "format_rate"))
    return (f"progress: step {steps[-1]['step']} | {steps[-1]['elapsed']:.0f}s of {seconds}s trained | "
            f"rollout acc {acc:.3f} | fmt {fmt:.3f} (last {len(last)} steps)")


def _train(ws: Workspace, run_dir: Path, lock: dict, budget: int | None, gpus: int, limit: int, seconds: int
           ) -> tuple[str | None, dict]:
    """Run train_dapo.py (under torchrun for several GPUs) in its own process group, killed after `limit` seconds,
    printing a progress line every PROGRESS_SECONDS; (crash reason or None, its summary block)."""
    env = ws.env(AUTOBUSTER_RUN_DIR=str(run_dir), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")  # no \r bars in run.log
    if budget is not None:
        env["AUTOBUSTER_TIME_BUDGET"] = str(budget)
    with open(run_dir / "run.log", "w") as log:
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
                                     if gpus > 1 else [])
        proc = subprocess.Popen(launch + [TRAIN_FILE], cwd=ws.root, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        lock["child"] = proc.pid
        ws.lock.write_text(json.dumps(lock))
        start = time.time()
        while True:
            try:
                rc = proc.wait(timeout=max(0.0, min(PROGRESS_SECONDS, start + limit - time.time())))
                break
            except subprocess.TimeoutExpired:
                if time.time() >= start + limit:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return f"timeout after {limit}s", {}
                print(progress(run_dir, seconds, time.time() - start), flush=True)
    text = (run_dir / "run.log").read_text(errors="replace")
    summary = parse_summary(text)
    lines = [line for line in text.splitlines() if line.strip()]
    if "ChildFailedError" in text:  # torchrun's traceback and report end the log; the reason is the failed rank's
        torchrun = max(i for i, line in enumerate(lines) if line.startswith("Traceback"))
        lines = [line for line in lines[:torchrun] if "torch/distributed/elastic/" not in line]
    fail = next((line for line in lines if line.startswith("FAIL:")), None)
    if fail or rc != 0:
        oom = next((line for line in lines if "out of memory" in line.lower() or "OutOfMemoryError" in line), None)
        return oom or fail or (lines[-1] if lines else f"exit code {rc}"), summary
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        return "no adapter saved in the run directory", summary
    return None, summary


def _score(ws: Workspace, run_dir: Path) -> dict:
    """The fixed evaluation, in its own process, from the saved adapter alone."""
    r = subprocess.run([sys.executable, "evaluate.py", "--adapter", str(run_dir / "adapter"), "--split", "val",
                        "--out", str(run_dir)], cwd=ws.root, capture_output=True, text=True, env=ws.env())
    (run_dir / "eval.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["evaluation failed"])[-1])
    return json.loads((run_dir / "metrics.json").read_text())


def _predictions(run_dir: Path) -> pd.DataFrame:
    return pd.read_json(run_dir / "predictions.jsonl", lines=True).set_index("id")


def run(description: str, budget: int | None = None, long: bool = False, gpus: str | None = None,
        ws: Workspace | None = None) -> dict:
    ws = ws or Workspace()
    recover(ws)
    state = ws.state()
    if ws.repo.active_branch.name != state["branch"]:
        raise UserError(f"on branch {ws.repo.active_branch.name}, not {state['branch']}: git checkout {state['branch']}")
    check_fixed(ws, state)
    setup = active()
    val = dataset.read_eval_set(setup, "val")
    if val["fingerprint"] != state["val_fingerprint"]:
        raise UserError(f"the prepared val set ({val['fingerprint']}) is not the one this loop started with "
                        f"({state['val_fingerprint']}): its scores would not compare; start a new loop with "
                        "`uv run autobuster init <tag>`, or set AUTOBUSTER_HOME back to the dataset it was run on")
    n_gpus = processes(gpus, ws)
    best = ws.best_kept()
    kept = ws.last_kept_commit()
    commit = _commit(ws, description, first=best is None or long)
    n = len(list(ws.runs.glob("*/run.json"))) if ws.runs.exists() else 0
    run_id = f"{n + 1:04d}-{commit[:7]}" + ("-long" if long else "")
    run_dir = ws.runs / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = dict(run_id=run_id, commit=commit, kept=kept if not long else commit, description=description,
                pid=os.getpid(), started=time.time())
    ws.lock.write_text(json.dumps(lock))
    seconds = setup.time_budget if budget is None else budget
    limit = seconds + ALLOWANCE.get(setup.profile, 3600)
    print(f"run {run_id}: profile {setup.profile} (AUTOBUSTER_HOME={home()}), "
          f"{seconds}s of training (wall clock) plus loading and evaluation, killed after {limit // 60} min; "
          f"log {run_dir / 'run.log'}", flush=True)
    crash, summary = _train(ws, run_dir, lock, budget, n_gpus, limit, seconds)
    memory, steps = summary.get("peak_memory_gb", 0.0), int(summary.get("num_steps", 0))
    if not crash and summary.get("training_seconds", 0) > OVERRUN * seconds + 60:
        crash = (f"trained {summary['training_seconds']:.0f}s, beyond the {seconds}s budget: TIME_BUDGET is fixed, "
                 "and every phase (stage 2 too) must fit in it")
    m, p_better = {}, 0.0
    if crash is None:
        print(f"scoring val ({len(val['ids'])} clips, fixed evaluation in its own process)", flush=True)
        try:
            m = _score(ws, run_dir)
        except RuntimeError as e:
            crash = f"evaluation failed: {e}"
    if crash:
        status = "crash"
    elif long:
        status = "long"
    elif best is None:
        status, p_better = "keep", 1.0
    else:
        a, b = _predictions(ws.runs / best["run_id"]), _predictions(run_dir)
        b = b.loc[a.index]
        p_better = metrics.paired_bootstrap(a.label.tolist(), a.prediction.tolist(), b.prediction.tolist())["p_better"]
        status = "keep" if m["f1"] > best["f1"] and p_better >= P_BETTER else "discard"
    record = finish(ws, lock, run_dir, status, m, memory, p_better, crash or "", steps)
    mins, secs = divmod(int(record["seconds"]), 60)
    if crash:
        print(f"crash  {crash}  log={run_dir / 'run.log'}")
        return record
    if best and best.get("steps") and steps < SLOW * best["steps"]:  # before the result: that line stays last
        print(f"warning: {steps} steps against {best['steps']} in the best run: the budget is wall-clock seconds, "
              "so a slower step (or another job on this machine) means fewer steps")
    against = f"best {best['f1']:.4f}, p_better {p_better:.3f}" if best else "the baseline"
    print(f"{status:<7} f1={m['f1']:.4f} ({against})  steps={steps}  "
          f"mem={memory:.1f}GB  {mins}m{secs:02d}s  run={run_dir}")
    return record


def merged(loops: list[Workspace]) -> tuple[pd.DataFrame, dict | None]:
    """All the loops' rows in one table with a `loop` column, and the best kept run of all. The rows go round
    robin (every loop's first run, then every second, ...): every run has the same budget, so that is about
    the order in which they finished."""
    tables = []
    for w in loops:
        rows = w.rows()
        tables.append(rows.assign(n=range(len(rows))).assign(loop=w.state()["tag"]))
    rows = pd.concat(tables).sort_values("n", kind="stable").drop(columns="n").reset_index(drop=True)
    kept = [dict(best, loop=w.state()["tag"]) for w in loops if (best := w.best_kept())]
    return rows[["loop"] + HEADER.split()], max(kept, key=lambda r: r["f1"], default=None)


def status(as_json: bool = False, all_loops: bool = False, ws: Workspace | None = None) -> dict:
    ws = ws or Workspace()
    if all_loops:  # read only: the other agents' runs may be in progress, and each repairs its own worktree
        loops = ws.loops()
        if not loops:
            raise UserError("no worktree of this repository has a loop: run `uv run autobuster worktrees <tag> "
                            "--gpus 0,1,...` or `uv run autobuster init <tag>` first")
        (rows, best), plot, recent = merged(loops), ws.root / "progress-all.png", 10 * len(loops)
    else:
        recover(ws)
        rows, best, plot, recent = ws.rows(), ws.best_kept(), ws.root / "progress.png", 10
    fields = ("run_id", "commit", "status", "f1", "accuracy", "p_better", "memory_gb", "steps", "seconds",
              "description", "note")
    decided = rows[rows.status.isin(["keep", "discard", "crash"])]
    last_keep = max((i for i, s in enumerate(decided.status) if s == "keep"), default=-1)
    since = len(decided) - 1 - last_keep
    info = dict(runs=len(rows), keeps=int((rows.status == "keep").sum()),
                discards=int((rows.status == "discard").sum()), crashes=int((rows.status == "crash").sum()),
                keep_rate=float((decided.status == "keep").mean()) if len(decided) else 0.0,
                best=best, runs_since_keep=since, plateau=since >= PLATEAU,
                recent=rows.tail(recent).to_dict("records") if all_loops else
                [{k: r.get(k) for k in fields} for r in ws.records()[-recent:]], progress=str(plot))
    if len(rows):
        plot_progress(rows, plot)
    if as_json:
        print(json.dumps(info, indent=1, default=str))
        return info
    print(rows.tail(recent).to_string(index=False) if len(rows) else "no runs yet")
    print(f"runs {info['runs']}  keep {info['keeps']}  discard {info['discards']}  crash {info['crashes']}  "
          f"keep rate {info['keep_rate']:.2f}  runs since keep {since}" + (
              f"  PLATEAU (no keep in {PLATEAU} runs)" if info["plateau"] else ""))
    if best:
        print(f"best: f1={best['f1']:.4f}  run={best['run_id']}" + (f" in {best['loop']}" if all_loops else "")
              + f"  {best['description']}")
    return info


def plot_progress(rows: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(1, len(rows) + 1)
    colours = {"keep": "tab:green", "discard": "tab:gray", "crash": "tab:red", "long": "tab:blue"}
    for s, c in colours.items():
        sel = [i for i, v in zip(x, rows.status) if v == s]
        if not sel:
            continue
        ax.scatter(sel, rows.f1[rows.status == s], c=c, label=s, zorder=3)
    best, running = 0.0, []
    for f1, s in zip(rows.f1, rows.status):
        best = max(best, f1) if s == "keep" else best
        running.append(best)
    ax.step(x, running, where="post", c="tab:green", alpha=0.6, label="best kept")
    for i, (f1, d) in zip(x, zip(rows.f1, rows.description)):
        ax.annotate(str(d)[:18], (i, f1), fontsize=7, rotation=30, xytext=(3, 3), textcoords="offset points")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("experiment")
    ax.set_ylabel("val F1")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlim(0.5, len(rows) + 1)  # room for the last label
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: it hides no point
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
