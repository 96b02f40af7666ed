"""Detection metrics with fake as the positive class, and the paired bootstrap that compares two runs."""
import numpy as np
import pandas as pd


def _as_binary(labels, preds) -> tuple[np.ndarray, np.ndarray]:
    """Boolean truth and prediction arrays (True = fake)."""
    y = np.asarray(labels) == "fake"
    p = np.asarray(preds)
    # "unclear" counts as wrong: the opposite of the label (FP on a real clip, FN on a fake one)
    return y, np.where(p == "unclear", ~y, p == "fake")


def _f1(tp, fp, fn):
    """F1 from counts (scalars or arrays); 0 where there is no positive at all, like zero_division=0."""
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC by the Mann-Whitney rank formula (ties get average ranks); None with a single class."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(score).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compute(labels, preds, p_fake, generators) -> dict:
    y, pred = _as_binary(labels, preds)
    # Python ints, so the MCC product below cannot overflow and the result is json-serialisable
    tp, fp, fn, tn = (int(np.sum(m)) for m in (y & pred, ~y & pred, y & ~pred, ~y & ~pred))
    n = len(y)
    score = np.asarray(p_fake, dtype=float)
    mcc_denom = float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    correct = pd.Series(y == pred).groupby(np.asarray(generators))
    return dict(
        n=n,
        accuracy=(tp + tn) / n if n else 0.0,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        f1=float(_f1(tp, fp, fn)),
        mcc=(tp * tn - fp * fn) / mcc_denom if mcc_denom else 0.0,
        confusion=dict(tn=tn, fp=fp, fn=fn, tp=tp),
        unclear_rate=float(np.mean(np.asarray(preds) == "unclear")) if n else 0.0,
        auc=auc(y, score),
        brier=float(np.mean((score - y) ** 2)) if n else 0.0,
        per_generator={str(g): dict(n=int(s.size), accuracy=float(s.mean())) for g, s in correct},
    )


def paired_bootstrap(labels, preds_a, preds_b, n: int = 2000, seed: int = 0) -> dict:
    """Resample the same items for both runs; F1(b) - F1(a): P(b better) (ties half) and a 95% interval."""
    y, a = _as_binary(labels, preds_a)
    _, b = _as_binary(labels, preds_b)
    # one (n, items) index matrix shared by both runs keeps the comparison paired
    idx = np.random.default_rng(seed).integers(0, len(y), (n, len(y)))

    def f1s(pred):
        """Observed F1 and the F1 of every resample, from per-item tp/fp/fn indicators gathered by idx."""
        kinds = (y & pred, ~y & pred, y & ~pred)
        return _f1(*(k.sum() for k in kinds)), _f1(*(k[idx].sum(1) for k in kinds))

    (fa, ra), (fb, rb) = f1s(a), f1s(b)
    d = rb - ra
    return dict(p_better=float(np.mean(d > 0) + 0.5 * np.mean(d == 0)), delta=float(fb - fa),
                low=float(np.percentile(d, 2.5)), high=float(np.percentile(d, 97.5)))
