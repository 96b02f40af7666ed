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


def paired_bootstrap(labels, runs_a, runs_b, n: int = 2000, seed: int = 0) -> dict:
    """Two configurations, each scored on the same items by one or more runs (a list of prediction lists each).
    Resample the items, the same ones for every run (paired), and take the mean F1 of b's runs minus the mean F1 of
    a's: P(b better) (ties half), the variance of that difference over resamples, and a 95% interval."""
    y = np.asarray(labels) == "fake"
    # one (n, items) index matrix shared by all runs keeps the comparison paired; as counts of each item in each
    # resample, a resample's tp/fp/fn of every run are one matrix product
    idx = np.random.default_rng(seed).integers(0, len(y), (n, len(y)))
    counts = np.bincount((idx + len(y) * np.arange(n)[:, None]).ravel(), minlength=n * len(y)).reshape(n, len(y))

    def mean_f1(runs):
        """Mean observed F1 and mean F1 of every resample, from per-item tp/fp/fn indicators."""
        preds = [_as_binary(labels, p)[1] for p in runs]
        kinds = np.stack([k for pred in preds for k in (y & pred, ~y & pred, y & ~pred)], axis=1).astype(float)
        tp, fp, fn = (kinds[:, i::3] for i in range(3))
        resampled = counts @ kinds  # (n, 3 * runs)
        return (_f1(tp.sum(0), fp.sum(0), fn.sum(0)).mean(),
                _f1(*(resampled[:, i::3] for i in range(3))).mean(axis=1))

    (fa, ra), (fb, rb) = mean_f1(runs_a), mean_f1(runs_b)
    d = rb - ra
    return dict(p_better=float(np.mean(d > 0) + 0.5 * np.mean(d == 0)), delta=float(fb - fa), var=float(d.var()),
                low=float(np.percentile(d, 2.5)), high=float(np.percentile(d, 97.5)))


def seed_noise(configurations: list[list[float]]) -> tuple[float, int]:
    """The run-to-run variance of F1 for identical code, pooled over every configuration with more than one run
    (each contributes its squared deviations from its own mean), and its degrees of freedom."""
    runs = [np.asarray(f1s, dtype=float) for f1s in configurations if len(f1s) > 1]
    df = sum(len(r) - 1 for r in runs)
    return (float(sum(((r - r.mean()) ** 2).sum() for r in runs) / df) if df else 0.0), df


def p_keep(delta: float, boot_var: float, seed_var: float, df: int, n_a: int, n_b: int) -> float | None:
    """P(b's configuration is better) from both noises: t = delta / sqrt(seed_var (1/n_a + 1/n_b) + boot_var), the
    seed noise of the two means plus the item sampling of their difference (slightly conservative: runs' per-item
    disagreement is in both), read on Student's t with the seed estimate's degrees of freedom. None while there is
    no seed estimate (df 0)."""
    if df < 1:
        return None
    from scipy.stats import t
    se = (seed_var * (1 / n_a + 1 / n_b) + boot_var) ** 0.5
    return float(t.cdf(delta / se, df)) if se > 0 else 0.5 + 0.5 * float(np.sign(delta))
