"""Prepare data and model once: `uv run prepare.py [--profile tiny|genbuster] [--dataset PATH] [--model DIR]`.

tiny: a synthetic dataset and a warm-started tiny Qwen2.5-VL, offline on CPU (minutes).
genbuster (default): GenBuster-200K-mini from the Hugging Face Hub and Qwen2.5-VL-7B-Instruct.
--dataset PATH: your own folder with real/ and fake/ (optionally fake/<generator>/) instead."""
import argparse

from autobuster.cli import guarded
from autobuster.preparation import prepare

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="genbuster", help="tiny or genbuster (default)")
    p.add_argument("--dataset", help="a folder with real/ and fake/ to use instead of the profile's data")
    p.add_argument("--model", help="base model directory or hub id (default: the profile's)")
    a = p.parse_args()
    guarded(prepare, a.profile, a.dataset, a.model)
