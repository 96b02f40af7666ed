"""The autoresearch loop: init, run (commit, train, score apart, keep or discard), status, long runs, and the
repair of an interrupted run. results.tsv and runs/ are append-only; a kept commit is never lost."""
import hashlib
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import git
import pandas as pd
import psutil

from . import dataset, metrics
from .errors import UserError
from .profiles import active, home

P_BETTER = 0.8  # the confidence a keep needs: on the paired bootstrap alone (one seed), then on both noises
PLATEAU = 10  # runs without a keep that `status` calls a plateau
OVERRUN = 1.1  # a run that trained past this share of the budget (+ 60 s for its last step) is a crash
SLOW = 0.7  # warn when a run made fewer than this share of the best run's steps
PROGRESS_SECONDS = 30  # the runner prints a `progress:` line this often while training, for an agent tailing it
PROGRESS_STEPS = 20  # the rollout accuracy and format rate it prints are means over this many last steps
ALLOWANCE = {"tiny": 600, "genbuster": 3600}  # seconds for loading + evaluation on top of the training budget
FIXED = ("prepare.py", "evaluate.py", "export.py", "src/autobuster")
# one row per run; the last four: the run's seed, its configuration's runs and mean F1 so far, P(better) from both
# noises (0 where the run was not compared)
HEADER = "commit\tf1\taccuracy\tmemory_gb\tp_better\tstatus\tdescription\tseed\tseeds\tmean_f1\tp_keep\n"
COLUMNS = HEADER.split()
SCORED = ("keep", "discard", "confirm", "repeat")  # the statuses of a run that counts in its configuration's mean
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
            return pd.DataFrame(columns=COLUMNS)
        return pd.read_csv(self.results, sep="\t", names=COLUMNS, skiprows=1, dtype={"commit": str},
                           keep_default_na=False)

    def append(self, r: dict) -> None:
        """One row, one write, append-only."""
        desc = " ".join(r["description"].split())  # no tabs or newlines inside the field
        line = (f"{r['commit']}\t{r['f1']:.6f}\t{r['accuracy']:.6f}\t{r['memory_gb']:.1f}\t{r['p_better']:.3f}\t"
                f"{r['status']}\t{desc}\t{r['seed']}\t{r['seeds']}\t{r['mean_f1']:.6f}\t{r['p_keep']:.3f}\n")
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

    def configurations(self) -> list[dict]:
        """Every train_dapo.py commit that has scored runs, oldest first: its runs, their F1s and mean, whether it was
        kept, and its best run (the one export takes, and whose step count a slow run is warned against)."""
        configs = {}
        for r in self.records():
            if r["status"] in SCORED:
                configs.setdefault(r["commit_full"], []).append(r)
        out = []
        for c, runs in configs.items():
            top = max(runs, key=lambda r: r["f1"])
            out.append(dict(commit=runs[0]["commit"], commit_full=c, description=runs[0]["description"],
                            seeds=len(runs), mean_f1=sum(r["f1"] for r in runs) / len(runs),
                            f1s=[r["f1"] for r in runs], run_ids=[r["run_id"] for r in runs],
                            kept=any(r["status"] == "keep" for r in runs), run_id=top["run_id"], steps=top["steps"]))
        return out

    def best_kept(self) -> dict | None:
        """The kept configuration with the highest mean val F1 over its seeds."""
        kept = [c for c in self.configurations() if c["kept"]]
        return max(kept, key=lambda c: c["mean_f1"]) if kept else None

    def seed_noise(self) -> dict:
        """The run-to-run spread of val F1 for identical code, pooled over every configuration with several runs."""
        configs = self.configurations()
        var, df = metrics.seed_noise([c["f1s"] for c in configs])
        return dict(sd=var ** 0.5, df=df, configurations=sum(c["seeds"] > 1 for c in configs))

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


def _alive(pid: int) -> bool:
    """Whether a process is running; a zombie (dead, its parent not reaping it: a container's init may never) is
    not. Another user's process counts as running."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def recover(ws: Workspace) -> None:
    """A runner that died mid-run left its lock: record that run as a crash and restore the kept state."""
    if not ws.lock.exists():
        return
    lock = json.loads(ws.lock.read_text())
    if _alive(lock["pid"]):
        raise UserError(f"run {lock['run_id']} is still in progress (pid {lock['pid']}); wait for it or kill it")
    if lock.get("child"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(lock["child"], signal.SIGKILL)  # a training process the dead runner left behind
        for _ in range(300):  # until it has let go of its GPU memory, so the next run has it all
            if not _alive(lock["child"]):
                break
            time.sleep(0.1)
        else:
            print(f"warning: training process {lock['child']} of run {lock['run_id']} is still there 30 s after "
                  f"SIGKILL; check that it is gone (nvidia-smi, ps) before the next run")
    finish(ws, lock, ws.runs / lock["run_id"], "crash", note="interrupted: the runner was killed (SIGKILL, or it "
           "died) before it could record the run")
    print(f"recovered run {lock['run_id']}: recorded as crash, branch back at {lock['kept'][:7]}")


def _reset(ws: Workspace, lock: dict, run_dir: Path) -> None:
    """Back to the kept commit, the candidate's diff saved beside the run. An edit of train_dapo.py made after the
    candidate was committed (during the run, or after a killed one) is not lost: it stays in the working tree."""
    (run_dir / "patch.diff").write_text(ws.repo.git.diff(lock["kept"], lock["commit"], "--", TRAIN_FILE) + "\n")
    path = ws.root / TRAIN_FILE
    edited = path.read_bytes() if path.exists() and ws.repo.git.hash_object(TRAIN_FILE) != \
        ws.repo.commit(lock["commit"]).tree[TRAIN_FILE].hexsha else None
    ws.repo.git.reset("--hard", lock["kept"])
    if edited is not None:
        (run_dir / "edited_during_run.py").write_bytes(edited)
        path.write_bytes(edited)
        print(f"kept your uncommitted edit of {TRAIN_FILE} (made after this run started) in the working tree; "
              f"a copy is in {run_dir / 'edited_during_run.py'}")


def finish(ws, lock, run_dir, status, m=None, memory_gb=0.0, p_better=0.0, note="", steps=0, p_keep=0.0):
    """Record the run (run.json, results.tsv). A discard or crash resets the branch to the kept commit and drops the
    adapters of the candidate's runs (a confirm's too); a keep, confirm or repeat keeps its adapter."""
    m, commit = m or {}, lock["commit"]
    run_dir.mkdir(parents=True, exist_ok=True)
    if status in ("discard", "crash"):
        if commit != lock["kept"]:
            _reset(ws, lock, run_dir)
        dropped = [run_dir] + [ws.runs / r["run_id"] for r in ws.records()
                               if r["commit_full"] == commit and commit != lock["kept"]]
        for adapter in (d / "adapter" for d in dropped):
            if adapter.exists():
                shutil.rmtree(adapter)
    f1 = m.get("f1", 0.0)
    same = [r["f1"] for r in ws.records() if r["commit_full"] == commit and r["status"] in SCORED]
    same += [f1] if status in SCORED else []
    record = dict(run_id=lock["run_id"], commit=commit[:7], commit_full=commit, status=status, f1=f1,
                  accuracy=m.get("accuracy", 0.0), memory_gb=memory_gb, p_better=p_better, p_keep=p_keep,
                  seed=lock.get("seed", 0), seeds=len(same), mean_f1=sum(same) / len(same) if same else 0.0,
                  description=lock["description"], note=note, steps=steps,
                  seconds=round(time.time() - lock["started"], 1))
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))
    ws.append(record)
    ws.lock.unlink(missing_ok=True)
    return record


def _commit(ws: Workspace, description: str, first: bool) -> str:
    ws.repo.index.add([TRAIN_FILE])
    if not ws.repo.index.diff("HEAD"):
        if not first:
            raise UserError(f"{TRAIN_FILE} is unchanged since the last kept run: make one change, then run (or `run "
                            "--repeat \"why\"` to run the kept commit again on a new seed)")
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
    """Run train_dapo.py (under torchrun for several GPUs) in its own process group, killed after `limit` seconds
    or when the runner is interrupted, printing a progress line every PROGRESS_SECONDS; (crash reason or None, its
    summary block)."""
    env = ws.env(AUTOBUSTER_RUN_DIR=str(run_dir), PYTHONUNBUFFERED="1", TQDM_DISABLE="1",  # no \r bars in run.log
                 AUTOBUSTER_SEED=str(lock["seed"]))
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
        try:
            while True:
                try:
                    rc = proc.wait(timeout=max(0.0, min(PROGRESS_SECONDS, start + limit - time.time())))
                    break
                except subprocess.TimeoutExpired:
                    if time.time() >= start + limit:
                        return f"timeout after {limit}s", {}
                    print(progress(run_dir, seconds, time.time() - start), flush=True)
        finally:  # a timeout, or the runner interrupted: its own session does not get the runner's signal
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = (run_dir / "run.log").read_text(errors="replace")
    summary = parse_summary(text)
    lines = [line for line in text.splitlines() if line.strip()]
    if "ChildFailedError" in text:  # torchrun's traceback and report end the log; the reason is the failed rank's
        torchrun = max(i for i, line in enumerate(lines) if line.startswith("Traceback"))
        lines = [line for line in lines[:torchrun] if "torch/distributed/elastic/" not in line]
    fail = next((line for line in lines if line.startswith("FAIL:")), None)
    # ended by a signal (killed by hand, the OOM killer): say so, not the last log line; torchrun reports a rank's
    # as "Signal 9 (SIGKILL) received by PID ..."
    killed = ([signal.Signals(-rc).name] if rc < 0 else
              re.findall(r"Signal \d+ \((SIG[A-Z]+)\) received", text) if rc else [])
    if killed and not fail:
        return f"interrupted by {killed[0]} (the training process)", summary
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


class Interrupted(KeyboardInterrupt):
    """The runner got SIGINT, SIGTERM or SIGHUP (Ctrl-C, kill, the agent's shell timing out)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible():
    """While a run is in progress, these signals raise Interrupted, so the run is recorded with its reason."""
    def handler(signum, frame):
        raise Interrupted(signum)
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.signal(s, handler) for s in caught}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def rule(labels: list, best: list[list], candidate: list[list], f1s: list[list[float]]) -> dict:
    """The keep rule's numbers: the paired bootstrap over the val clips of the mean F1 of each side's runs
    (prediction lists) gives delta and p_better; p_keep adds the seed noise pooled from `f1s` (every
    configuration's run F1s, the candidate's included) to the bootstrap's variance (None without any yet)."""
    boot = metrics.paired_bootstrap(labels, best, candidate)
    var, df = metrics.seed_noise(f1s)
    return dict(p_better=boot["p_better"], delta=boot["delta"], seeds=len(candidate),
                p_keep=metrics.p_keep(boot["delta"], boot["var"], var, df, len(best), len(candidate)))


def compare(ws: Workspace, best: dict, commit: str, runs: list[dict]) -> dict:
    """`rule` for the candidate `commit` (`runs`: its scored runs, this one included, each with run_id and f1)
    against the best kept configuration, from the runs' saved predictions."""
    a, b = ([_predictions(ws.runs / i) for i in ids] for ids in (best["run_ids"], [r["run_id"] for r in runs]))
    clips = a[0].index  # every run's predictions in one clip order
    others = [c["f1s"] for c in ws.configurations() if c["commit_full"] != commit]
    return rule(a[0].label.tolist(), [x.prediction.loc[clips].tolist() for x in a],
                [x.prediction.loc[clips].tolist() for x in b], others + [[r["f1"] for r in runs]])


def verdict(c: dict) -> str:
    """keep: better by more than both noises allow; confirm: better on the paired bootstrap alone, with one seed
    (a second seed decides); discard otherwise."""
    if c["p_keep"] is not None and c["p_keep"] >= P_BETTER:
        return "keep"
    if c["seeds"] == 1 and c["delta"] > 0 and c["p_better"] >= P_BETTER:
        return "confirm"
    return "discard"


def run(description: str, budget: int | None = None, long: bool = False, gpus: str | None = None,
        repeat: bool = False, ws: Workspace | None = None) -> dict:
    """One experiment: commit train_dapo.py (or, with `repeat`, take the kept commit again), train and score it on
    a new seed, and decide. The baseline gets a second seed at once (the first estimate of the seed noise); a
    candidate better on one seed but not beyond the seed noise gets a confirming run before the decision."""
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
    best, kept = ws.best_kept(), ws.last_kept_commit()
    if repeat:
        if best is None:
            raise UserError("nothing is kept yet to repeat: run the baseline first (`uv run autobuster run baseline`)")
        if ws.repo.is_dirty(path=TRAIN_FILE):
            raise UserError(f"--repeat runs the kept commit again, and {TRAIN_FILE} has uncommitted edits: run them "
                            f"as an experiment, or set them aside first (`git stash`)")
        commit = kept
    else:
        commit = _commit(ws, description, first=best is None or long)
    seconds = setup.time_budget if budget is None else budget
    kind = "long" if long else "repeat" if repeat else "baseline" if best is None else "candidate"
    with interruptible():
        while True:
            record = _attempt(ws, commit, kept, description, kind, budget, n_gpus, seconds, val, best)
            if record["status"] == "keep" and kind == "baseline":
                kind, best = "repeat", ws.best_kept()  # the baseline's second seed
            elif record["status"] == "confirm":
                kind = "confirming"
            else:
                return record


def _attempt(ws, commit, kept, description, kind, budget, n_gpus, seconds, val, best) -> dict:
    """One run of `commit` on its next seed: train, score, decide, record, print its result line."""
    setup = active()
    records = ws.records()
    seed = sum(r["commit_full"] == commit for r in records)  # every run of one commit has its own seed
    run_id = f"{len(records) + 1:04d}-{commit[:7]}" + ("-long" if kind == "long" else "")
    run_dir = ws.runs / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = dict(run_id=run_id, commit=commit, kept=commit if kind == "long" else kept, description=description,
                pid=os.getpid(), started=time.time(), seed=seed, kind=kind)
    ws.lock.write_text(json.dumps(lock))
    limit = seconds + ALLOWANCE.get(setup.profile, 3600)
    what = {"repeat": f"a repeat of the kept commit {commit[:7]}", "confirming": "the confirming run"}.get(kind, kind)
    print(f"run {run_id}: {what}, seed {seed}, profile {setup.profile} (AUTOBUSTER_HOME={home()}), "
          f"{seconds}s of training (wall clock) plus loading and evaluation, killed after {limit // 60} min; "
          f"log {run_dir / 'run.log'}", flush=True)
    try:
        crash, summary = _train(ws, run_dir, lock, budget, n_gpus, limit, seconds)
        memory, steps = summary.get("peak_memory_gb", 0.0), int(summary.get("num_steps", 0))
        if not crash and summary.get("training_seconds", 0) > OVERRUN * seconds + 60:
            crash = (f"trained {summary['training_seconds']:.0f}s, beyond the {seconds}s budget: TIME_BUDGET is "
                     "fixed, and every phase (stage 2 too) must fit in it")
        m = {}
        if crash is None:
            print(f"scoring val ({len(val['ids'])} clips, fixed evaluation in its own process)", flush=True)
            try:
                m = _score(ws, run_dir)
            except RuntimeError as e:
                crash = f"evaluation failed: {e}"
    except Interrupted as e:
        finish(ws, lock, run_dir, "crash", note=f"interrupted by {e}")
        print(f"crash   interrupted by {e}  log={run_dir / 'run.log'}", flush=True)
        raise
    if crash:
        record = finish(ws, lock, run_dir, "crash", note=crash, steps=steps, memory_gb=memory)
        print(f"crash   {crash}  log={run_dir / 'run.log'}")
        return record
    c = {}
    if kind in ("long", "repeat", "baseline"):
        status = "keep" if kind == "baseline" else kind
    else:
        mine = [r for r in ws.records() if r["commit_full"] == commit and r["status"] in SCORED]
        c = compare(ws, best, commit, mine + [dict(run_id=run_id, f1=m["f1"])])
        status = verdict(c)
    record = finish(ws, lock, run_dir, status, m, memory, c.get("p_better", 0.0), steps=steps,
                    p_keep=c.get("p_keep") or 0.0)
    if best and best.get("steps") and steps < SLOW * best["steps"]:  # before the result: that line stays last
        print(f"warning: {steps} steps against {best['steps']} in the best run: the budget is wall-clock seconds, "
              "so a slower step (or another job on this machine) means fewer steps")
    mins, secs = divmod(int(record["seconds"]), 60)
    print(f"{status:<7} f1={m['f1']:.4f} ({explain(ws, kind, record, c, best)})  steps={steps}  "
          f"mem={memory:.1f}GB  {mins}m{secs:02d}s  run={run_dir}", flush=True)
    return record


def explain(ws: Workspace, kind: str, r: dict, c: dict, best: dict | None) -> str:
    """The result line's parenthesis: what the run was compared with, and why it got its status."""
    if kind == "baseline":
        return "the baseline, seed 0; a second seed follows, to measure the seed noise"
    if kind == "long":
        return "a long run, not compared"
    if kind == "repeat":
        spread = ws.seed_noise()
        return (f"seed {r['seed']} of the kept commit {r['commit']}: {r['seeds']} seeds, mean {r['mean_f1']:.4f}; "
                f"seed noise sd {spread['sd']:.4f} over {spread['df']} df")
    why = {"keep": "confirmed on a second seed" if kind == "confirming" else "better beyond both noises",
           "confirm": "better on the paired bootstrap, not yet beyond the seed noise: a confirming run on a new seed "
                      "follows",
           "discard": "not confirmed on a second seed" if kind == "confirming" else
                      "not better than the best" if c["delta"] <= 0 else "not better by more than the noise allows",
           }[r["status"]]
    p_keep = "n/a (no seed noise measured yet)" if c["p_keep"] is None else f"{c['p_keep']:.3f}"
    return (f"{r['seeds']} seed{'s' if r['seeds'] > 1 else ''}, mean {r['mean_f1']:.4f} vs {best['mean_f1']:.4f} "
            f"({best['seeds']} seeds of {best['commit']}), p_keep {p_keep}, p_better {c['p_better']:.3f}: {why}")


def merged(loops: list[Workspace]) -> tuple[pd.DataFrame, list[dict]]:
    """All the loops' rows in one table with a `loop` column, and all their configurations. The rows go round
    robin (every loop's first run, then every second, ...): every run has the same budget, so that is about
    the order in which they finished."""
    tables, configs = [], []
    for w in loops:
        rows, tag = w.rows(), w.state()["tag"]
        tables.append(rows.assign(n=range(len(rows))).assign(loop=tag))
        configs += [dict(c, loop=tag) for c in w.configurations()]
    rows = pd.concat(tables).sort_values("n", kind="stable").drop(columns="n").reset_index(drop=True)
    return rows[["loop"] + COLUMNS], configs


def status(as_json: bool = False, all_loops: bool = False, ws: Workspace | None = None) -> dict:
    ws = ws or Workspace()
    if all_loops:  # read only: the other agents' runs may be in progress, and each repairs its own worktree
        loops = ws.loops()
        if not loops:
            raise UserError("no worktree of this repository has a loop: run `uv run autobuster worktrees <tag> "
                            "--gpus 0,1,...` or `uv run autobuster init <tag>` first")
        (rows, configs), plot, recent = merged(loops), ws.root / "progress-all.png", 10 * len(loops)
    else:
        recover(ws)
        rows, configs, plot, recent = ws.rows(), ws.configurations(), ws.root / "progress.png", 10
    fields = ("run_id", "commit", "status", "seed", "f1", "accuracy", "p_better", "p_keep", "seeds", "mean_f1",
              "memory_gb", "steps", "seconds", "description", "note")
    decided = rows[rows.status.isin(["keep", "discard", "crash"])]  # one per experiment (not repeats, confirms)
    last_keep = max((i for i, s in enumerate(decided.status) if s == "keep"), default=-1)
    since = len(decided) - 1 - last_keep
    var, df = metrics.seed_noise([c["f1s"] for c in configs])
    ranked = sorted(configs, key=lambda c: -c["mean_f1"])
    best = next((c for c in ranked if c["kept"]), None)
    info = dict(runs=len(rows), keeps=int((rows.status == "keep").sum()),
                discards=int((rows.status == "discard").sum()), crashes=int((rows.status == "crash").sum()),
                repeats=int((rows.status == "repeat").sum()), confirms=int((rows.status == "confirm").sum()),
                keep_rate=float((decided.status == "keep").mean()) if len(decided) else 0.0,
                best=best, runs_since_keep=since, plateau=since >= PLATEAU,
                seed_noise=dict(sd=var ** 0.5, df=df, configurations=sum(c["seeds"] > 1 for c in configs)),
                configurations=ranked,
                recent=rows.tail(recent).to_dict("records") if all_loops else
                [{k: r.get(k) for k in fields} for r in ws.records()[-recent:]], progress=str(plot))
    if len(rows):
        plot_progress(rows, plot)
    if as_json:
        print(json.dumps(info, indent=1, default=str))
        return info
    shown = (["loop"] if all_loops else []) + ["commit", "status", "seed", "f1", "p_better", "p_keep", "seeds",
                                               "mean_f1", "description"]
    print(rows[shown].tail(recent).to_string(index=False) if len(rows) else "no runs yet")
    print(f"runs {info['runs']}  keep {info['keeps']}  discard {info['discards']}  crash {info['crashes']}  "
          f"repeat {info['repeats']}  confirm {info['confirms']}  keep rate {info['keep_rate']:.2f}  "
          f"runs since keep {since}" + (f"  PLATEAU (no keep in {PLATEAU} runs)" if info["plateau"] else ""))
    print(f"seed noise: sd {var ** 0.5:.4f} of val F1 between seeds of identical code ({df} df, from "
          f"{info['seed_noise']['configurations']} configuration(s) with several runs)" if df else
          "seed noise: not measured yet (the baseline's second seed measures it)")
    if ranked:
        print("configurations by mean val F1:")
        for c in ranked[:5]:
            print(f"  {c['mean_f1']:.4f}  {c['seeds']} seed{'s' if c['seeds'] > 1 else ' '}  "
                  f"{'kept     ' if c['kept'] else 'discarded'}  {c['commit']}"
                  + (f" in {c['loop']}" if all_loops else "") + f"  {c['description']}")
    if best:
        print(f"best: mean f1={best['mean_f1']:.4f} over {best['seeds']} seed{'s' if best['seeds'] > 1 else ''}  "
              f"commit {best['commit']}  run={best['run_id']}" + (f" in {best['loop']}" if all_loops else "")
              + f"  {best['description']}")
    return info


def plot_progress(rows: pd.DataFrame, path: Path) -> None:
    """Every run's val F1 by status, the best kept configuration's mean as a step line, and the kept runs'
    descriptions (only those: a label per run overlaps), staggered."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.8))
    x = list(range(1, len(rows) + 1))
    colours = {"keep": "tab:green", "discard": "tab:gray", "crash": "tab:red", "long": "tab:blue",
               "repeat": "tab:olive", "confirm": "tab:orange"}
    for s, c in colours.items():
        sel = rows.status == s
        if sel.any():
            ax.scatter([i for i, on in zip(x, sel) if on], rows.f1[sel], c=c, label=s, zorder=3, s=18)
    f1s, kept, running = {}, set(), []
    for (loop, commit), f1, s in zip(zip(rows.get("loop", [""] * len(rows)), rows.commit), rows.f1, rows.status):
        if s in SCORED:
            f1s.setdefault((loop, commit), []).append(f1)
        if s == "keep":
            kept.add((loop, commit))
        running.append(max((sum(f1s[k]) / len(f1s[k]) for k in kept), default=float("nan")))
    ax.step(x, running, where="post", c="tab:green", alpha=0.6, label="best kept (mean over seeds)")
    keeps = [(i, f1, d) for i, f1, d, s in zip(x, rows.f1, rows.description, rows.status) if s == "keep"]
    for k, (i, f1, d) in enumerate(keeps):
        ax.annotate(str(d)[:28], (i, f1), fontsize=7, xytext=(4, (10, -14, 22)[k % 3]), textcoords="offset points",
                    arrowprops=dict(arrowstyle="-", lw=0.4, alpha=0.5))
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("run")
    ax.set_ylabel("val F1")
    ax.set_ylim(-0.02, 1.08)
    ax.set_xlim(0.5, len(rows) + 2)  # room for the last label
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: it hides no point
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
