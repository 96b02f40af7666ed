"""The `autobuster` command: init, run, status, train, demo."""
import argparse
import sys

from .errors import UserError


def guarded(fn, *args, **kwargs):
    """Run a command; a user mistake prints one line that says what to do (exit 2), never a traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    p = argparse.ArgumentParser(prog="autobuster", description="autoresearch for AI-generated video detection")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("init", help="start a loop on branch autobuster/<tag>")
    s.add_argument("tag")
    s = sub.add_parser("run", help="commit train_dapo.py, train, score, keep or discard")
    s.add_argument("description")
    s.add_argument("--budget", type=int, help="training seconds (default: the profile's fixed budget)")
    s = sub.add_parser("status", help="best run, keep rate, recent runs, plateau; writes progress.png")
    s.add_argument("--json", action="store_true", help="machine-readable, for the agent")
    s = sub.add_parser("train", help="a long run of the current train_dapo.py, recorded with status long")
    s.add_argument("--hours", type=float, required=True)
    sub.add_parser("demo", help="the whole pipeline on the tiny profile, offline, on CPU, in a scratch folder")
    a = p.parse_args(argv)
    from . import loop
    if a.cmd == "init":
        guarded(loop.init, a.tag)
    elif a.cmd == "run":
        guarded(loop.run, a.description, a.budget)
    elif a.cmd == "status":
        guarded(loop.status, a.json)
    elif a.cmd == "train":
        guarded(loop.run, f"long run, {a.hours:g} h", int(a.hours * 3600), True)
    elif a.cmd == "demo":
        from .demo import demo
        guarded(demo)


if __name__ == "__main__":
    main()
