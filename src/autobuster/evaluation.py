"""The fixed evaluation: batched greedy decoding over a pinned set, answer parsing, P(fake) from the A/B
logits at the answer letter, metrics, and the files a run leaves (metrics.json, predictions.jsonl, PNG)."""
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import engine, metrics
from .errors import UserError
from .model import chat_text, encode
from .prompt import Format, thinks

NO_THINK_MAX_NEW_TOKENS = 16  # room for the answer alone and the end token; a reply that thinks is cut short


def letter_pairs(tokenizer) -> dict[int, tuple[int, int]]:
    """token id -> (id with A, id with B) for every token that ends in the answer letter after non-letters
    ('A', 'ĠA', '>A', ...): byte-level BPE may merge the letter with what precedes it."""
    vocab = tokenizer.get_vocab()
    pairs = {}
    for tok, i in vocab.items():
        if tok.endswith("A") and not any(c.isalnum() for c in tok[:-1]) and tok[:-1] + "B" in vocab:
            b = vocab[tok[:-1] + "B"]
            pairs[i] = pairs[b] = (i, b)
    return pairs


def letter_index(tokenizer, ids: list[int], anchor: str) -> int | None:
    """Index of the token that writes the first character after the last `anchor` (the answer letter), if any."""
    pieces = [tokenizer.decode([i]) for i in ids]
    text = "".join(pieces)
    at = text.rfind(anchor)
    if at < 0:
        return None
    c = at + len(anchor)
    while c < len(text) and text[c].isspace():
        c += 1
    end = 0
    for k, piece in enumerate(pieces):
        end += len(piece)
        if end > c:
            return k
    return None


def answer_p_fake(tokenizer, ids: list[int], tracked: np.ndarray, pairs: dict, column: dict, anchor: str) -> float:
    """P(fake) = softmax over (A, B) logits at the step that wrote the letter after the last `anchor` (the
    format's: <answer> or \\boxed{); 0.5 if none."""
    k = letter_index(tokenizer, ids, anchor)
    if k is None or ids[k] not in pairs:
        return 0.5
    a, b = pairs[ids[k]]
    la, lb = tracked[k, column[a]], tracked[k, column[b]]
    return float(1 / (1 + np.exp(la - lb)))


def predict(model, processor, rows, frames_of, pixel_cap: int, batch: int, max_new_tokens: int, fmt: Format,
            desc: str = "evaluating", mode: str | None = None) -> list[dict]:
    """Greedy replies for `rows` (dicts with id, label, generator) in the format `fmt`; `frames_of(row)` gives the
    frames; `mode` as in Format.prompt_for (default: the fixed prompt)."""
    tok = processor.tokenizer
    text = chat_text(processor, fmt, mode)
    pairs = letter_pairs(tok)
    track = sorted(pairs)
    column = {t: j for j, t in enumerate(track)}
    out = []
    for start in tqdm(range(0, len(rows), batch), desc=desc, leave=False):
        chunk = rows[start:start + batch]
        done = engine.generate(model, processor, encode(processor, [frames_of(r) for r in chunk], pixel_cap, text),
                               greedy=True, max_new_tokens=max_new_tokens, track_ids=track)
        for j, r in enumerate(chunk):
            ids = done.ids[j, :done.lengths[j]].tolist()
            out.append(dict(id=r["id"], label=r["label"], generator=r["generator"],
                            prediction=fmt.parse(done.texts[j]),
                            p_fake=answer_p_fake(tok, ids, done.tracked[j].numpy(), pairs, column, fmt.anchor),
                            response=done.texts[j], truncated=bool(done.truncated[j])))
    return out


def score(preds: list[dict]) -> dict:
    m = metrics.compute([p["label"] for p in preds], [p["prediction"] for p in preds],
                        [p["p_fake"] for p in preds], [p["generator"] for p in preds])
    m["think_rate"] = sum(thinks(p["response"]) for p in preds) / max(len(preds), 1)  # replies with a think block
    return m


def write(out_dir: Path, m: dict, preds: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for p in preds:
            f.write(json.dumps(p) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=2))
    confusion_png(m, out_dir / "confusion.png")


def confusion_png(m: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = m["confusion"]
    grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(grid, cmap="Blues")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, str(v), ha="center", va="center", color="black" if v < grid.max() / 2 else "white")
    ax.set_xticks([0, 1], ["real", "fake"])
    ax.set_yticks([0, 1], ["real", "fake"])
    ax.set_xlabel("predicted (unclear counts as wrong)")
    ax.set_ylabel("label")
    ax.set_title(f"F1 {m['f1']:.3f}  acc {m['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(m: dict) -> str:
    """The metrics table, the per-generator table, and the grep-able headline `f1:` line last."""
    lines = [f"{k:<14}{m[k]:.6f}" if isinstance(m[k], float) else f"{k:<14}{m[k]}"
             for k in ("accuracy", "precision", "recall", "mcc", "auc", "brier", "unclear_rate", "think_rate", "n")]
    c = m["confusion"]
    lines.append(f"{'confusion':<14}tn {c['tn']}  fp {c['fp']}  fn {c['fn']}  tp {c['tp']}")
    lines.append("generator         n  accuracy")
    for g, v in sorted(m["per_generator"].items()):
        lines.append(f"  {g:<14}{v['n']:>4}  {v['accuracy']:.4f}")
    lines.append(f"f1:           {m['f1']:.6f}")
    return "\n".join(lines)


def max_new_tokens(setup, mode: str | None) -> int:
    return NO_THINK_MAX_NEW_TOKENS if mode == "no_think" else setup.settings.eval_max_new_tokens


def evaluate_model(model, processor, setup, split: str = "val", limit: int | None = None,
                   mode: str | None = None) -> tuple[dict, list]:
    """Metrics and predictions of a loaded model on a pinned set or split; the set's fingerprint goes in. `mode`
    "no_think" asks for the answer alone and decodes only a few tokens."""
    from . import dataset
    rows, fingerprint = dataset.eval_clips(setup, split, limit)
    s = setup.settings
    preds = predict(model, processor, rows.to_dict("records"), lambda r: dataset.load_frames(setup, r),
                    s.pixel_cap, s.eval_batch, max_new_tokens(setup, mode), setup.model_family.format,
                    desc=f"evaluating {split}", mode=mode)
    m = score(preds)
    m.update(split=split, fingerprint=fingerprint, profile=setup.profile, mode=mode or "fixed")
    return m, preds


def evaluate_videos(model, processor, setup, paths: list[Path], mode: str | None = None) -> None:
    """Reasoning, verdict and P(fake) for each video; unusable files are reported, skipped and counted."""
    from .video import BadVideo, decode_clip
    skipped = 0
    for path in paths:
        try:
            frames = decode_clip(path, setup.settings.pixel_cap, setup.model_family.factor)
        except BadVideo as e:
            print(f"skipped {path}: {e}")
            skipped += 1
            continue
        p = predict(model, processor, [dict(id=str(path), label="", generator="")], lambda r: frames,
                    setup.settings.pixel_cap, 1, max_new_tokens(setup, mode), setup.model_family.format,
                    desc=path.name, mode=mode)[0]
        print(f"== {path}\n{p['response']}\nverdict: {p['prediction']}  p_fake: {p['p_fake']:.4f}")
    print(f"{len(paths) - skipped} videos scored, {skipped} skipped")
    if skipped == len(paths):
        raise UserError(f"no video could be scored: {'the file' if len(paths) == 1 else f'all {len(paths)} files'} "
                        "failed to decode (reasons above); give mp4 clips of at least 4 s")
