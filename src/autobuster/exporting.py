"""Package the best kept run: holdout and wild evaluation, LoRA merged into the base, a Hugging Face model directory
(safetensors, config, processor, greedy generation config) with a model card carrying the metrics."""
import json
import re
import shutil
import time
from pathlib import Path

from .errors import UserError
from .loop import TRAIN_FILE, Workspace
from .profiles import active


TITLES = {"holdout": "Holdout: unseen generators", "wild": "Wild: in-the-wild generators"}


def pick_run(ws: Workspace, run_id: str | None) -> dict:
    if run_id:
        f = ws.runs / run_id / "run.json"
        if not f.exists():
            raise UserError(f"no run {run_id} under {ws.runs}")
        run = json.loads(f.read_text())
        if not (ws.runs / run_id / "adapter").exists():
            raise UserError(f"run {run_id} has no adapter (only kept and long runs keep theirs)")
        return run
    best = ws.best_kept()
    if not best:
        raise UserError("no kept run yet: run `uv run autobuster run \"baseline\"` first")
    # the best-scoring seed of the configuration with the best mean (the record's own mean dates from its run)
    run = json.loads((ws.runs / best["run_id"] / "run.json").read_text())
    return run | dict(seeds=best["seeds"], mean_f1=best["mean_f1"])


def constants(source: str) -> str:
    """The top-level constants of train_dapo.py at the run's commit, for the model card."""
    return "\n".join(line for line in source.splitlines() if re.match(r"^[A-Z][A-Z0-9_]* = ", line))


def table(m: dict) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {k} | {m[k]:.4f} |" for k in ("f1", "accuracy", "precision", "recall", "mcc", "auc", "brier",
                                              "unclear_rate") if isinstance(m.get(k), float)]
    rows += ["", "| generator | n | accuracy |", "|---|---|---|"]
    rows += [f"| {g} | {v['n']} | {v['accuracy']:.4f} |" for g, v in sorted(m["per_generator"].items())]
    return "\n".join(rows)


def export(run_id: str | None = None, out: str | None = None, adapter_only: bool = False) -> Path:
    from . import evaluation
    from .model import load
    ws = Workspace()
    run = pick_run(ws, run_id)
    run_dir = ws.runs / run["run_id"]
    setup = active()
    setup.check_device()
    out = Path(out or ws.root / "exports" / run["run_id"])
    if out.exists():
        raise UserError(f"{out} exists already: remove it or pass --out")
    val = json.loads((run_dir / "metrics.json").read_text())
    model, processor = load(setup.model, str(run_dir / "adapter"))  # merged into the base weights
    # the pinned sets the model never saw chosen on: unseen generators, in-the-wild ones (where the data has them)
    scored = {name: evaluation.evaluate_model(model, processor, setup, name)[0]
              for name in ("holdout", "wild") if setup.eval_set(name).exists()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter_only:
        shutil.copytree(run_dir / "adapter", tmp)
    else:
        ends = sorted({processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})
        model.generation_config.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                                       repetition_penalty=1.0, eos_token_id=ends,
                                       pad_token_id=processor.tokenizer.pad_token_id)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    for name, m in scored.items():
        (tmp / f"{name}_metrics.json").write_text(json.dumps(m, indent=2))
    (tmp / "val_metrics.json").write_text(json.dumps(val, indent=2))
    source = ws.repo.git.show(f"{run['commit_full']}:{TRAIN_FILE}")
    card = [f"# autobuster detector ({run['run_id']})", "",
            f"{setup.family} fine-tuned with LoRA + DAPO to tell real video from AI-generated video (fake = positive).",
            f"Base: `{setup.model}`. " + ("LoRA adapter only." if adapter_only else "LoRA merged into the base."),
            f"Commit `{run['commit']}`: {run['description']}. Exported {time.strftime('%Y-%m-%d %H:%M')}.", "",
            f"Seed {run.get('seed', 0)}; this commit's mean val F1 over its {run.get('seeds', 1)} seed(s): "
            f"{run.get('mean_f1', val['f1']):.4f}.", "",
            "Ask it with the BusterX++ prompt and one video of 16 frames at 4 fps; it answers "
            f"{setup.model_family.format.described} (A real, B fake).", "",
            f"## Validation (pinned set {val.get('fingerprint')}, {val['n']} clips)", "", table(val), ""]
    for name, m in scored.items():
        card += [f"## {TITLES[name]} (set {m['fingerprint']}, {m['n']} clips)", "", table(m), ""]
    card += ["## Training constants", "", "```python", constants(source), "```", ""]
    (tmp / "README.md").write_text("\n".join(card))
    tmp.replace(out)
    print(f"exported {run['run_id']} (val f1 {val['f1']:.4f}"
          + "".join(f", {name} f1 {m['f1']:.4f}" for name, m in scored.items()) + f") to {out}")
    return out
