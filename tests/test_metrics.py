"""metrics.py against scikit-learn (and pandas for the per-generator table) as the oracle."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from autobuster import metrics

GENERATORS = ["sora", "veo", "kling"]


def random_run(seed: int, n: int = 300, unclear: float = 0.15):
    """Labels, predictions (some unclear), p_fake with ties, and generators ("real" for real clips)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["real", "fake"], n)
    preds = rng.choice(["real", "fake"], n).astype(object)
    preds[rng.random(n) < unclear] = "unclear"
    p_fake = rng.integers(0, 21, n) / 20  # coarse grid, so the AUC tie handling is exercised
    generators = np.where(labels == "real", "real", rng.choice(GENERATORS, n))
    return list(labels), list(preds), list(p_fake), list(generators)


def sklearn_view(labels, preds):
    """0/1 truth and prediction for sklearn, with unclear mapped to the wrong class."""
    y = np.array([lab == "fake" for lab in labels], dtype=int)
    pred = np.array([1 - t if p == "unclear" else int(p == "fake") for t, p in zip(y, preds)])
    return y, pred


def check_against_sklearn(labels, preds, p_fake, generators):
    m = metrics.compute(labels, preds, p_fake, generators)
    y, pred = sklearn_view(labels, preds)
    kw = dict(zero_division=0)
    assert m["n"] == len(labels)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, **kw))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred, **kw))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, **kw))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert m["confusion"] == dict(tn=tn, fp=fp, fn=fn, tp=tp)
    assert m["unclear_rate"] == pytest.approx(np.mean(np.asarray(preds) == "unclear"))
    if len(set(y)) == 2:
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p_fake))
    else:
        assert m["auc"] is None
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p_fake))
    json.dumps(m)  # plain Python types only
    for v in (m[k] for k in ("accuracy", "precision", "recall", "f1", "mcc", "unclear_rate", "brier")):
        assert type(v) is float and not np.isnan(v)
    assert all(type(v) is int for v in m["confusion"].values())
    return m


@pytest.mark.parametrize("seed", range(6))
def test_random_inputs_match_sklearn(seed):
    labels, preds, p_fake, generators = random_run(seed, unclear=[0.0, 0.1, 0.3, 0.5, 0.15, 0.05][seed])
    m = check_against_sklearn(labels, preds, p_fake, generators)
    y, pred = sklearn_view(labels, preds)
    expected = pd.DataFrame(dict(g=generators, ok=y == pred)).groupby("g")["ok"].agg(["size", "mean"])
    assert set(m["per_generator"]) == set(expected.index)
    for g, row in expected.iterrows():
        assert m["per_generator"][g]["n"] == row["size"]
        assert m["per_generator"][g]["accuracy"] == pytest.approx(row["mean"])


def test_no_predicted_positives():
    labels = ["fake", "real", "fake", "real"]
    m = check_against_sklearn(labels, ["real"] * 4, [0.2, 0.1, 0.4, 0.3], ["sora", "real", "veo", "real"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["recall"] == 0.0 and m["mcc"] == 0.0


def test_all_unclear():
    labels = ["fake", "real", "fake", "real", "real"]
    m = check_against_sklearn(labels, ["unclear"] * 5, [0.5] * 5, ["sora", "real", "veo", "real", "real"])
    assert m["accuracy"] == 0.0 and m["unclear_rate"] == 1.0
    assert m["confusion"] == dict(tn=0, fp=3, fn=2, tp=0)
    assert m["auc"] == 0.5  # constant scores rank everything as a tie


@pytest.mark.parametrize("label", ["real", "fake"])
def test_single_class(label):
    gen = "real" if label == "real" else "sora"
    m = check_against_sklearn([label] * 4, ["real", "fake", "unclear", label], [0.1, 0.9, 0.5, 0.3], [gen] * 4)
    assert m["auc"] is None


def test_perfect_predictions():
    labels = ["fake", "real", "fake", "real", "fake"]
    m = check_against_sklearn(labels, labels, [0.9, 0.1, 0.8, 0.2, 0.7], ["sora", "real", "veo", "real", "sora"])
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == m["mcc"] == m["auc"] == 1.0
    assert all(v["accuracy"] == 1.0 for v in m["per_generator"].values())


def correct_with_rate(rng, labels, rate):
    """Predictions that are right with probability `rate`, wrong otherwise."""
    flip = {"real": "fake", "fake": "real"}
    return [lab if rng.random() < rate else flip[lab] for lab in labels]


def test_bootstrap_identical_predictions():
    labels, preds, _, _ = random_run(1)
    r = metrics.paired_bootstrap(labels, [preds], [preds], n=500)
    assert r == dict(p_better=0.5, delta=0.0, var=0.0, low=0.0, high=0.0)


def test_bootstrap_clearly_better():
    rng = np.random.default_rng(7)
    labels = list(rng.choice(["real", "fake"], 400))
    a, b = correct_with_rate(rng, labels, 0.6), correct_with_rate(rng, labels, 0.85)
    r = metrics.paired_bootstrap(labels, [a], [b])
    observed = skm.f1_score(*sklearn_view(labels, b)) - skm.f1_score(*sklearn_view(labels, a))
    assert r["delta"] == pytest.approx(observed)
    assert r["p_better"] > 0.95 and r["low"] > 0
    assert r["low"] <= r["delta"] <= r["high"]
    # swapping the runs mirrors the answer
    s = metrics.paired_bootstrap(labels, [b], [a])
    assert s["p_better"] < 0.05 and s["high"] < 0


@pytest.mark.parametrize("seed", range(3))
def test_bootstrap_interval_contains_delta_and_is_deterministic(seed):
    labels, a, _, _ = random_run(seed)
    _, b, _, _ = random_run(seed + 100)
    r = metrics.paired_bootstrap(labels, [a], [b], seed=seed)
    assert r["low"] <= r["delta"] <= r["high"]
    assert r == metrics.paired_bootstrap(labels, [a], [b], seed=seed)
    json.dumps(r)


def test_bootstrap_resamples_match_sklearn_f1():
    """Re-derive the bootstrap by brute force with sklearn on the same indices."""
    labels, a, _, _ = random_run(3, n=60)
    _, b, _, _ = random_run(4, n=60)
    n, seed = 50, 11
    idx = np.random.default_rng(seed).integers(0, len(labels), (n, len(labels)))
    (y, pa), (_, pb) = sklearn_view(labels, a), sklearn_view(labels, b)
    d = np.array([skm.f1_score(y[i], pb[i], zero_division=0) - skm.f1_score(y[i], pa[i], zero_division=0)
                  for i in idx])
    r = metrics.paired_bootstrap(labels, [a], [b], n=n, seed=seed)
    assert r["low"] == pytest.approx(np.percentile(d, 2.5))
    assert r["high"] == pytest.approx(np.percentile(d, 97.5))
    assert r["p_better"] == pytest.approx(np.mean(d > 1e-12) + 0.5 * np.mean(np.abs(d) <= 1e-12))


def test_bootstrap_of_several_seeds_matches_sklearn():
    """Two runs against three: every resample's mean F1 over each side's runs, by brute force with sklearn."""
    labels, *_ = random_run(5, n=60)
    a = [random_run(10 + i, n=60)[1] for i in range(2)]
    b = [random_run(20 + i, n=60)[1] for i in range(3)]
    n, seed = 40, 3
    idx = np.random.default_rng(seed).integers(0, len(labels), (n, len(labels)))

    def mean_f1(runs, i):
        return np.mean([skm.f1_score(*(v[i] for v in sklearn_view(labels, p)), zero_division=0) for p in runs])

    d = np.array([mean_f1(b, i) - mean_f1(a, i) for i in idx])
    r = metrics.paired_bootstrap(labels, a, b, n=n, seed=seed)
    everything = np.arange(len(labels))
    assert r["delta"] == pytest.approx(mean_f1(b, everything) - mean_f1(a, everything))
    assert r["var"] == pytest.approx(d.var())
    assert r["p_better"] == pytest.approx(np.mean(d > 1e-12) + 0.5 * np.mean(np.abs(d) <= 1e-12))


def test_seed_noise_is_the_pooled_variance():
    configs = [[0.81, 0.86], [0.9], [0.7, 0.74, 0.69], []]
    var, df = metrics.seed_noise(configs)
    assert df == 1 + 2  # one-run configurations say nothing about the spread
    assert var == pytest.approx((np.var(configs[0], ddof=1) * 1 + np.var(configs[2], ddof=1) * 2) / 3)
    assert metrics.seed_noise([[0.8], [0.9]]) == (0.0, 0)


@pytest.mark.parametrize("a,b", [([0.80, 0.84], [0.90]), ([0.80, 0.84, 0.83], [0.86, 0.85]), ([0.9, 0.8], [0.7])])
def test_p_keep_without_item_noise_is_students_t_test(a, b):
    """With the item-sampling term at 0 and the spread pooled from these two configurations, p_keep is one minus
    scipy's one-sided two-sample t-test p-value (equal variances)."""
    from scipy import stats
    var, df = metrics.seed_noise([a, b])
    p = metrics.p_keep(np.mean(b) - np.mean(a), 0.0, var, df, len(a), len(b))
    assert p == pytest.approx(1 - stats.ttest_ind(b, a, alternative="greater").pvalue)
    # item sampling noise only widens the interval: P moves towards 0.5
    wider = metrics.p_keep(np.mean(b) - np.mean(a), 0.001, var, df, len(a), len(b))
    assert abs(wider - 0.5) < abs(p - 0.5)
    assert metrics.p_keep(0.05, 0.001, 0.0, 0, 1, 1) is None  # no seed estimate yet
