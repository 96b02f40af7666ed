"""The fixed evaluation.

  uv run evaluate.py [--model DIR|HUB_ID] [--adapter DIR] [--split val|holdout|wild|SPLIT] [--limit N]
                     [--mode think|no_think]
  uv run evaluate.py PATH        (a video file or a folder of videos: reasoning, verdict and P(fake) each)

Writes metrics.json, predictions.jsonl and confusion.png to --out; the headline line starts with `f1:`."""
import argparse
import time
from dataclasses import replace
from pathlib import Path

from autobuster.cli import guarded


def main(a):
    from autobuster import dataset, evaluation
    from autobuster.errors import UserError
    from autobuster.families import family_of_model
    from autobuster.model import load
    from autobuster.profiles import active
    setup = active()
    setup.check_device()
    if a.path:  # every check that needs no model comes before the slow load
        p = Path(a.path)
        if not p.exists():
            raise UserError(f"{p} does not exist: give a video file or a folder of videos")
        paths = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        if not paths:
            raise UserError(f"{p} holds no files: give a video file or a folder of videos")
    else:
        dataset.eval_clips(setup, a.split, a.limit)  # an unknown split or a missing pinned set: one line, now
    model, processor = load(a.model or setup.model, a.adapter, four_bit=a.four_bit)
    # another family's --model is scored in its own format, on frames sized for it (the same prepared clips)
    setup = replace(setup, family=family_of_model(model).name)
    if a.path:
        return evaluation.evaluate_videos(model, processor, setup, paths, a.mode)
    t0 = time.time()
    m, preds = evaluation.evaluate_model(model, processor, setup, a.split, a.limit, a.mode)
    m.update(model=a.model or setup.model, adapter=a.adapter, seconds=round(time.time() - t0, 1))
    out = Path(a.out or f"evals/{a.split}{'-' + a.mode if a.mode else ''}-{time.strftime('%Y%m%d-%H%M%S')}")
    evaluation.write(out, m, preds)
    print(evaluation.report(m))
    print(f"written to {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", help="a video file or folder to score instead of a split")
    p.add_argument("--model", help="base model directory or hub id (default: the prepared profile's)")
    p.add_argument("--adapter", help="a peft LoRA adapter directory")
    p.add_argument("--split", default="val",
                   help="a pinned set: val (default; Bench id), holdout (Bench ood: unseen generators) or wild (Bench "
                        "wild: in-the-wild generators); or a whole split of the manifest (id, ood, wild, test, ...)")
    p.add_argument("--limit", type=int, help="score only the first N clips")
    p.add_argument("--out", help="output folder (default evals/<split>-<time>; runs/ holds only the loop's record)")
    p.add_argument("--mode", choices=("think", "no_think"),
                   help="BusterX++'s switch on the prompt: /think, or /no_think for the answer alone (short decoding, "
                        "much faster); default: the fixed prompt, which asks for reasoning")
    p.add_argument("--four-bit", action="store_true", help="load the base weights in 4-bit NF4")
    guarded(main, p.parse_args())
