"""Export the best kept run (by val F1) as a Hugging Face model directory with a model card.

  uv run export.py [--run ID] [--out DIR] [--adapter-only]"""
import argparse

from autobuster.cli import guarded
from autobuster.exporting import export

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run id under runs/ (default: the best kept run)")
    p.add_argument("--out", help="output directory (default exports/<run id>)")
    p.add_argument("--adapter-only", action="store_true", help="save the LoRA adapter, not a merged model")
    a = p.parse_args()
    guarded(export, a.run, a.out, a.adapter_only)
