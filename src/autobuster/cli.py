"""The `autobuster` command."""
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
    sub.add_parser("demo", help="the whole pipeline on the tiny profile, offline, on CPU")
    a = p.parse_args(argv)
    if a.cmd == "demo":
        from .demo import demo
        guarded(demo)
