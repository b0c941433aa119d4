"""The benchmark report's learning curve: Dice and NSD against the number of labelled cases, from cases.csv alone.

Each point is a trainer's mean over the source folds' validation cases (or the test cases), after averaging every
case over the repeats -- the paired unit, since every trainer trained on the same subsets. Bands are bootstrap 95 %
CIs of that mean over cases; the repeat spread (sd of the per-repeat means) shows how much the draw of the N cases
moves it. Each size is compared with the baseline as the rest of the report is (paired per case, Wilcoxon), with
Holm's correction over sizes, classes and trainers (one family per metric).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_dino.evaluation.label_efficiency import ALL
from nnunet_dino.evaluation.metrics import METRICS
from nnunet_dino.evaluation.stats import bootstrap_ci, compare_to_baseline, holm
from nnunet_dino.evaluation.tables import fmt, markdown_table, p_value

CURVE_SPLITS = {"curve": "validation cases of the source folds", "curve_test": "test set"}
PLOTTED = (("dice", "Dice"), ("nsd", "NSD"))


def _sources(split: str) -> tuple[str, ...]:
    """The splits of cases.csv a curve is drawn from: validation subsets plus the source folds' own "all" point."""
    return ("cv", "curve") if split == "curve" else ("curve_test",)


def curve_splits(cases: pd.DataFrame) -> list[str]:
    """The curves cases.csv holds (none for a benchmark run without --labelled)."""
    if "labelled" not in cases.columns:
        return []
    labelled = cases[cases["labelled"].notna()]
    return [s for s in CURVE_SPLITS if labelled.split.isin(_sources(s)).any()]


def sort_labelled(values) -> list[str]:
    """"2", "5", "10", "all" in that order."""
    return sorted({str(v) for v in values}, key=lambda v: (v == ALL, int(v) if v != ALL else 0))


def _curve_rows(cases: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of cases.csv one curve is drawn from, with ``labelled`` as text ("2", "all")."""
    part = cases[cases.split.isin(_sources(split)) & cases["labelled"].notna()]
    return part.assign(labelled=part["labelled"].astype(str))


def curve_cases(cases: pd.DataFrame, split: str) -> pd.DataFrame:
    """One row per labelled size, source fold, case, class and trainer, metrics averaged over the repeats."""
    part = _curve_rows(cases, split)
    keys = ["labelled", "source_fold", "case", "class", "trainer"]
    grouped = part.groupby(keys, sort=False)
    out = grouped[list(METRICS)].mean().join(grouped["n_labelled"].mean()).reset_index()
    return out.assign(split=out["labelled"], fold=out["source_fold"].astype(int).astype(str))


def curve_points(cases: pd.DataFrame, split: str, seed: int = 0) -> pd.DataFrame:
    """Per size, class and trainer: mean n_labelled, and per metric the mean, its 95 % CI and the repeat spread."""
    per_case = curve_cases(cases, split)
    raw = _curve_rows(cases, split)
    rows = []
    for (labelled, cls, trainer), group in per_case.groupby(["labelled", "class", "trainer"], sort=False):
        row = {"split": split, "labelled": labelled, "class": cls, "trainer": trainer,
               "n_labelled": float(group["n_labelled"].mean()), "cases": len(group)}
        mine = raw[(raw["labelled"] == labelled) & (raw["class"] == cls) & (raw.trainer == trainer)]
        row["repeats"] = int(mine["repeat"].nunique())
        for metric, _ in PLOTTED:
            values = group[metric].to_numpy(float)
            low, high = bootstrap_ci(values, np.mean, seed)
            per_repeat = mine.groupby("repeat")[metric].mean()
            row |= {f"{metric}_mean": float(values.mean()), f"{metric}_ci_low": low, f"{metric}_ci_high": high,
                    f"{metric}_repeat_sd": float(per_repeat.std()) if len(per_repeat) > 1 else math.nan}
        rows.append(row)
    order = {v: i for i, v in enumerate(sort_labelled(per_case["labelled"]))}
    table = pd.DataFrame(rows)
    return table.sort_values("labelled", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def curve_comparison(cases: pd.DataFrame, split: str, baseline: str, seed: int = 0) -> pd.DataFrame:
    """compare_to_baseline at each size (its "split" column holds the size), Holm over sizes, classes, trainers."""
    table = compare_to_baseline(curve_cases(cases, split), baseline, metrics=[m for m, _ in PLOTTED], seed=seed)
    if table.empty:
        return table
    table = table.rename(columns={"split": "labelled"})
    for _, family in table.groupby("metric").groups.items():
        table.loc[family, "p_holm"] = holm(table.loc[family, "p_wilcoxon"].tolist())
    return table


def curve_plot(points: pd.DataFrame, target: Path) -> Path:
    """Rows Dice and NSD, one column per class; a line per trainer with its CI band, x = labelled cases (log)."""
    from nnunet_dino.evaluation.report_plots import _pyplot, _save

    plt = _pyplot()
    classes, trainers = list(dict.fromkeys(points["class"])), list(dict.fromkeys(points["trainer"]))
    fig, axes = plt.subplots(len(PLOTTED), len(classes), figsize=(1.5 + 3.6 * len(classes), 6.8), squeeze=False)
    for (metric, label), row in zip(PLOTTED, axes, strict=True):
        for cls, ax in zip(classes, row, strict=True):
            for i, trainer in enumerate(trainers):
                p = points[(points["class"] == cls) & (points.trainer == trainer)].sort_values("n_labelled")
                x = p["n_labelled"].to_numpy(float)
                colour = f"C{i}"
                ax.plot(x, p[f"{metric}_mean"], "o-", color=colour, ms=4)
                ax.fill_between(x, p[f"{metric}_ci_low"], p[f"{metric}_ci_high"], color=colour, alpha=0.15, lw=0)
            ticks = points.drop_duplicates("labelled")
            ax.set_xscale("log")
            ax.set_xticks(ticks["n_labelled"], [f"{v:g}" if lab != ALL else f"all\n({v:g})"
                                                for lab, v in zip(ticks["labelled"], ticks["n_labelled"])],
                          fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{cls}: {label}", fontsize=9)
            ax.set_xlabel("labelled training cases", fontsize=8)
            ax.grid(alpha=0.3)
    # the legend (full trainer names) sits under the panels, where it cannot hide a curve
    handles = axes[0][0].get_lines()[: len(trainers)]
    fig.legend(handles, trainers, loc="lower left", fontsize=7, frameon=False, bbox_to_anchor=(0.01, 0.0))
    fig.text(0.99, 0.005, "mean over cases (each case averaged over the repeats)\nband = bootstrap 95 % CI",
             fontsize=7, va="bottom", ha="right")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * len(trainers), 1, 1))
    return _save(fig, target)


def _cell(mean: float, low: float, high: float, sd: float) -> str:
    text = f"{mean:.3f}" + (f" [{low:.3f}, {high:.3f}]" if np.isfinite(low) else "")
    return text + (f" (±{sd:.3f})" if np.isfinite(sd) else "")


def curve_tables(cases: pd.DataFrame, baseline: str, seed: int = 0) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per curve in cases.csv: its points and its comparison with the baseline (computed once for the report and
    summary.json: both bootstrap)."""
    return {s: (curve_points(cases, s, seed), curve_comparison(cases, s, baseline, seed)) for s in curve_splits(cases)}


def curve_section(curves: dict[str, tuple[pd.DataFrame, pd.DataFrame]], trainers: list[str], costs: pd.DataFrame,
                  baseline: str, out: Path) -> list[str]:
    """The report's "Label efficiency" section(s) from ``curve_tables``: plot, mean Dice per size, paired
    comparison, cost per size; ``trainers`` gives the row order."""

    lines = []
    for split, (points, cmp) in curves.items():
        what = CURVE_SPLITS[split]
        if points.empty:
            continue
        plot = curve_plot(points, out / f"learning_curve_{split}.png")
        sizes = sort_labelled(points["labelled"])
        repeats = int(points["repeats"].max())
        lines += [f"## Label efficiency: {what}", "",
                  f"Each trainer trained on the same seeded subsets of N labelled cases per source fold ({repeats} "
                  f"repeat{'s' if repeats > 1 else ''}; subsets nested), always for the same number of optimizer "
                  f"steps; 'all' is the whole fold. Cells: mean Dice [95 % bootstrap CI over cases] (± sd over "
                  f"repeats).", "", f"![Learning curve]({plot.relative_to(out).as_posix()})", ""]
        header = ["Class", "Trainer"] + [f"N = {s}" if s != ALL else "all" for s in sizes]
        rows = []
        for (cls, trainer), group in sorted(points.groupby(["class", "trainer"], sort=False),
                                            key=lambda kv: trainers.index(kv[0][1])):
            by = group.set_index("labelled")
            rows.append([cls, trainer + (" (baseline)" if trainer == baseline else "")] + [
                _cell(by.at[s, "dice_mean"], by.at[s, "dice_ci_low"], by.at[s, "dice_ci_high"],
                      by.at[s, "dice_repeat_sd"]) if s in by.index else "–" for s in sizes])
        lines += ["### Mean Dice per number of labelled cases", ""] + markdown_table(header, rows) + [""]
        cmp = cmp.sort_values("labelled", key=lambda c: c.map({v: i for i, v in enumerate(sizes)}), kind="stable")
        rows = [[r["labelled"], r["class"], r["trainer"], r["metric"],
                 f"{fmt(r['mean_diff'])} [{fmt(r['mean_diff_ci'][0])}, {fmt(r['mean_diff_ci'][1])}]",
                 p_value(r["p_wilcoxon"]), p_value(r["p_holm"]), f"{r['wins']}/{r['ties']}/{r['losses']}"]
                for _, r in cmp.iterrows()]
        lines += [f"### Versus the baseline ({baseline}) at each N, paired per case", "",
                  "Δ = trainer − baseline (each case averaged over the repeats first); Wilcoxon signed-rank p, "
                  "Holm-corrected over sizes, classes and trainers per metric; W/T/L = cases better/equal/worse.", ""]
        lines += markdown_table(["N", "Class", "Trainer", "Metric", "Δ mean [95 % CI]", "p", "p (Holm)", "W/T/L"], rows)
        lines += [""]
    if lines and "labelled" in costs.columns and costs["train_time_s"].notna().any():
        runs = costs.dropna(subset=["labelled"]).astype({"labelled": str})
        agg = runs.groupby(["trainer", "labelled"], sort=False)["train_time_s"].agg(["mean", "count"])
        sizes = sort_labelled(runs["labelled"])
        rows = [[t] + [f"{fmt(agg.loc[(t, s), 'mean'] / 60, 1)} ({int(agg.loc[(t, s), 'count'])})"
                       if (t, s) in agg.index else "–" for s in sizes]
                for t in dict.fromkeys(costs["trainer"])]
        lines += ["### Training minutes per run at each N (runs)", ""] + markdown_table(
            ["Trainer"] + [f"N = {s}" if s != ALL else "all" for s in sizes], rows) + [""]
    return lines
