"""The `autobuster` command: init, run, status, train, worktrees, demo, bench."""
import argparse
import os
import sys

from .errors import UserError
from .profiles import PROFILES

if not sys.stderr.isatty():  # progress bars redraw with \r: in a log file they are noise (set before tqdm loads)
    os.environ.setdefault("TQDM_DISABLE", "1")


def guarded(fn, *args, **kwargs):
    """Run a command; a user mistake prints one line that says what to do (exit 2), never a traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP during a run (loop.Interrupted)
        print(f"interrupted by {e}" if str(e) else "interrupted", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", 2))


GPUS = "GPUs to train on, one torchrun process each: a number or `all` (default: $AUTOBUSTER_GPUS, else 1)"


def main(argv=None):
    p = argparse.ArgumentParser(prog="autobuster", description="autoresearch for AI-generated video detection")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("init", help="start a loop on branch autobuster/<tag>")
    s.add_argument("tag")
    s = sub.add_parser("run", help="commit train_dapo.py, train, score, keep or discard (or --repeat the kept one)")
    s.add_argument("description")
    s.add_argument("--budget", type=int, help="training seconds (default: the profile's fixed budget)")
    s.add_argument("--gpus", help=GPUS)
    s.add_argument("--repeat", action="store_true",
                   help="run the kept commit again on a new seed (its mean over seeds is its score)")
    s = sub.add_parser("status", help="configurations by mean F1, seed noise, keep rate, recent runs, plateau; "
                       "writes progress.png")
    s.add_argument("--json", action="store_true", help="machine-readable, for the agent")
    s.add_argument("--all", action="store_true", help="every worktree's loop in one table and progress-all.png")
    s = sub.add_parser("train", help="a long run of the current train_dapo.py, recorded with status long")
    s.add_argument("--hours", type=float, required=True)
    s.add_argument("--gpus", help=GPUS)
    s = sub.add_parser("worktrees", help="one git worktree and loop per GPU, for one agent each")
    s.add_argument("tag")
    s.add_argument("--gpus", required=True, help="GPU numbers, e.g. 0,1,2,3")
    sub.add_parser("demo", help="the whole pipeline on the tiny profile, offline, on CPU, in a scratch folder")
    s = sub.add_parser("bench", help="engine vs plain Hugging Face speed and memory at a real size, random weights")
    s.add_argument("--family", default="qwen2.5-vl", help="qwen2.5-vl or qwen3.5")
    s.add_argument("--size", help="qwen2.5-vl: 7b (default), 3b or tiny; qwen3.5: 4b (default) or tiny")
    s.add_argument("--frames", type=int, default=16)
    s.add_argument("--side", type=int, default=448, help="frame side in pixels (448 -> 2,048 video tokens)")
    s.add_argument("--prompts", type=int, default=8, help="prompts (videos) per step")
    s.add_argument("--group", type=int, default=8, help="G samples per prompt")
    s.add_argument("--new-tokens", type=int, default=512)
    s.add_argument("--four-bit", action="store_true", help="NF4 base weights (QLoRA)")
    s.add_argument("--no-plain", action="store_true", help="skip the plain Hugging Face path")
    s.add_argument("--micro-tokens", type=int, default=16384, help="engine update: tokens per micro-batch")
    s.add_argument("--checkpointing", choices=("memory", "all"), default="memory",
                   help="engine update: recompute layers once free GPU memory runs short, or every layer")
    s.add_argument("--check", action="store_true", help="greedy agreement with generate, first 64 tokens")
    s.add_argument("--eval-clips", type=int, default=64, help="clips for the evaluation timing (0 skips it)")
    s.add_argument("--eval-batch", type=int, default=PROFILES["genbuster"].eval_batch,
                   help="clips per greedy evaluation batch (default: the genbuster profile's)")
    s.add_argument("--eval-new-tokens", type=int, default=PROFILES["genbuster"].eval_max_new_tokens,
                   help="evaluation reply cap (default: the genbuster profile's)")
    s.add_argument("--json", help="write the results to this file")
    a = p.parse_args(argv)
    if a.cmd in ("init", "run", "status", "train", "worktrees"):
        from . import loop  # git and the plotting stack: only the loop's commands need them
    if a.cmd == "init":
        guarded(loop.init, a.tag)
    elif a.cmd == "run":
        guarded(loop.run, a.description, a.budget, gpus=a.gpus, repeat=a.repeat)
    elif a.cmd == "status":
        guarded(loop.status, a.json, a.all)
    elif a.cmd == "train":
        guarded(loop.run, f"long run, {a.hours:g} h", int(a.hours * 3600), True, a.gpus)
    elif a.cmd == "worktrees":
        guarded(loop.worktrees, a.tag, a.gpus)
    elif a.cmd == "bench":
        from .bench import bench
        size = a.size or ("4b" if a.family == "qwen3.5" else "7b")
        guarded(bench, size, a.frames, a.side, a.prompts, a.group, a.new_tokens, a.four_bit, not a.no_plain,
                a.micro_tokens, check=a.check, out=a.json, eval_clips=a.eval_clips, eval_batch=a.eval_batch,
                eval_new_tokens=a.eval_new_tokens, checkpointing=True if a.checkpointing == "all" else "memory",
                family=a.family)
    elif a.cmd == "demo":
        from .demo import demo
        guarded(demo)


if __name__ == "__main__":
    main()
