"""Paired statistics for ``nnunet-dino benchmark``, computed from the per-case table (cases.csv) alone.

Per split (cross-validation or test), class and metric, each trainer is compared with the baseline on the same
cases: mean and median of the paired differences with bootstrap 95 % CIs (``scipy.stats.bootstrap``, BCa, seeded),
the Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``, zero differences dropped; all differences zero -> p = 1)
with Holm's correction across classes and trainers (one family per split and metric), and win/tie/loss counts
(a tie is an exactly equal value). Differences are "trainer minus baseline" for every metric; for the distance
metrics a negative difference is an improvement, and wins count improvements.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from nnunet_dino.evaluation.metrics import HIGHER_IS_BETTER, METRICS

KEYS = ["split", "fold", "case", "class"]


def paired_table(cases: pd.DataFrame, metric: str, baseline: str) -> pd.DataFrame:
    """Cases as rows, trainers as columns (one split and class at a time is the caller's filter); only cases every
    trainer has are kept, so the comparison is paired."""
    wide = cases.pivot_table(index=["fold", "case"], columns="trainer", values=metric, aggfunc="first")
    if baseline not in wide.columns:
        raise ValueError(f"baseline {baseline!r} has no rows")
    return wide.dropna()


def bootstrap_ci(values: np.ndarray, statistic, seed: int = 0, n_resamples: int = 2000) -> tuple[float, float]:
    """95 % BCa interval (percentile interval where BCa is undefined, e.g. a median over few distinct values); a
    constant sample has a zero-width interval, fewer than 3 values have none (NaN)."""
    if values.size < 3:
        return math.nan, math.nan
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on tiny or near-degenerate samples warns and may return NaN
        from scipy.stats import bootstrap

        for method in ("BCa", "percentile"):
            res = bootstrap((values,), statistic, n_resamples=n_resamples, method=method,
                            rng=np.random.default_rng(seed))
            low, high = res.confidence_interval
            if np.isfinite(low) and np.isfinite(high):
                break
    return float(low), float(high)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1 when every difference is zero (no evidence of any difference)."""
    if diffs.size == 0:
        return math.nan
    if np.all(diffs == 0):
        return 1.0
    from scipy.stats import wilcoxon

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny samples: scipy warns that the normal approximation is rough
        return float(wilcoxon(diffs, zero_method="wilcox").pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count towards the family size)."""
    p = np.asarray(p_values, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(p.shape, np.nan)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def compare_to_baseline(cases: pd.DataFrame, baseline: str, metrics: Sequence[str] = METRICS,
                        seed: int = 0) -> pd.DataFrame:
    """One row per split, metric, class and non-baseline trainer (see the module docstring)."""
    rows = []
    for (split, cls), group in cases.groupby(["split", "class"], sort=False):
        for metric in metrics:
            wide = paired_table(group, metric, baseline)
            for trainer in [t for t in wide.columns if t != baseline]:
                diffs = (wide[trainer] - wide[baseline]).to_numpy(float)
                better = diffs > 0 if HIGHER_IS_BETTER[metric] else diffs < 0
                rows.append({
                    "split": split, "metric": metric, "class": cls, "trainer": trainer, "baseline": baseline,
                    "n": int(diffs.size), "mean_diff": float(diffs.mean()) if diffs.size else math.nan,
                    "mean_diff_ci": bootstrap_ci(diffs, np.mean, seed),
                    "median_diff": float(np.median(diffs)) if diffs.size else math.nan,
                    "median_diff_ci": bootstrap_ci(diffs, np.median, seed),
                    "p_wilcoxon": wilcoxon_p(diffs),
                    "wins": int(better.sum()), "ties": int((diffs == 0).sum()),
                    "losses": int(diffs.size - better.sum() - (diffs == 0).sum()),
                })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_holm"] = np.nan
    for _, family in table.groupby(["split", "metric"]).groups.items():
        table.loc[family, "p_holm"] = holm(table.loc[family, "p_wilcoxon"].tolist())
    return table


def mean_ranks(cases: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Mean rank per trainer (1 = best) over the paired cases, per split and class; ties share the mean rank."""
    from scipy.stats import rankdata

    rows = []
    for (split, cls), group in cases.groupby(["split", "class"], sort=False):
        wide = group.pivot_table(index=["fold", "case"], columns="trainer", values=metric, aggfunc="first").dropna()
        values = wide.to_numpy(float) if HIGHER_IS_BETTER[metric] is False else -wide.to_numpy(float)
        ranks = rankdata(values, axis=1) if len(wide) else np.empty((0, len(wide.columns)))
        for j, trainer in enumerate(wide.columns):
            rows.append({"split": split, "class": cls, "metric": metric, "trainer": trainer,
                         "mean_rank": float(ranks[:, j].mean()) if len(wide) else math.nan})
    return pd.DataFrame(rows)


def describe(cases: pd.DataFrame, by: Sequence[str] = ("split", "class", "trainer"),
             metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean, standard deviation, median and count of each metric per group (per fold with ``by`` + fold)."""
    grouped = cases.groupby(list(by), sort=False)[list(metrics)]
    out = grouped.agg(["mean", "std", "median", "count"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    return out.reset_index()


def empty_counts(cases: pd.DataFrame) -> pd.DataFrame:
    """How many (case, class) pairs had an empty reference, an empty prediction, or both, per trainer."""
    c = cases.assign(both_empty=cases.ref_empty & cases.pred_empty,
                     only_ref_empty=cases.ref_empty & ~cases.pred_empty,
                     only_pred_empty=~cases.ref_empty & cases.pred_empty)
    return c.groupby(["split", "trainer", "class"], sort=False)[
        ["both_empty", "only_ref_empty", "only_pred_empty"]].sum().reset_index()


def summarise(cases: pd.DataFrame, baseline: str, seed: int = 0) -> dict:
    """Everything the report shows, as plain JSON-able data."""
    def records(df: pd.DataFrame) -> list[dict]:
        return json_safe(df.to_dict(orient="records"))

    return {
        "baseline": baseline,
        "trainers": list(dict.fromkeys(cases["trainer"])),
        "per_trainer": records(describe(cases)),
        "per_fold": records(describe(cases[cases.split == "cv"], by=("split", "fold", "class", "trainer"),
                                     metrics=("dice", "nsd"))),
        "versus_baseline": records(compare_to_baseline(cases, baseline, seed=seed)),
        "ranks": records(pd.concat([mean_ranks(cases, "dice"), mean_ranks(cases, "nsd")], ignore_index=True)),
        "empty_masks": records(empty_counts(cases)),
    }


def json_safe(value):
    """NaN -> None, numpy scalars -> Python, tuples -> lists (summary.json is strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
