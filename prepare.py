"""Prepare data and model once: `uv run prepare.py [--profile tiny|genbuster] [--dataset PATH] [--model DIR|HUB_ID]
[--family qwen2.5-vl|qwen3.5]`.

tiny: a synthetic dataset and a warm-started tiny model (Qwen2.5-VL, or Qwen3.5 with --family qwen3.5), offline on
CPU (minutes).
genbuster (default): train clips from l8cv/GenBuster-200K-mini, evaluation clips from l8cv/GenBuster-Bench (each at
a pinned revision), and the base model (Qwen/Qwen2.5-VL-7B-Instruct; Qwen/Qwen3.5-4B with --family qwen3.5), all from
the Hugging Face Hub; offline (HF_HUB_OFFLINE=1) once they are in the Hugging Face cache or under $AUTOBUSTER_HOME.
--dataset PATH: your own folder with real/ and fake/ (optionally fake/<generator>/) instead.
The model's family sets the prompt and reply format every run is scored in (BusterX++ 2025 on Qwen2.5-VL, 2026 on
Qwen3.5); both families share one prepared dataset."""
import argparse

from autobuster.cli import guarded
from autobuster.hub import BENCH_REVISION, TRAIN_REVISION
from autobuster.preparation import prepare

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="genbuster", help="tiny or genbuster (default)")
    p.add_argument("--dataset", help="a folder with real/ and fake/ to use instead of the profile's data")
    p.add_argument("--model", help="base model directory or hub id (default: the family's, or the tiny model)")
    p.add_argument("--family", help="qwen2.5-vl (default) or qwen3.5: the tiny model's or the default base model's "
                                    "family (with --model, read from its config)")
    p.add_argument("--keep-archives", action="store_true",
                   help="keep the downloaded zip/7z archives after a verified extraction (default: delete them)")
    p.add_argument("--train-revision", help=f"GenBuster-200K-mini revision (default: pinned {TRAIN_REVISION[:12]})")
    p.add_argument("--bench-revision", help=f"GenBuster-Bench revision (default: pinned {BENCH_REVISION[:12]})")
    a = p.parse_args()
    guarded(prepare, a.profile, a.dataset, a.model, a.keep_archives, a.train_revision, a.bench_revision, a.family)
