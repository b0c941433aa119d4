"""The benchmark's outputs: cases.csv, costs.csv, summary.json, report.md / report.html and the plots.

Everything below is a function of ``cases.csv`` (metrics and statistics), ``costs.csv`` (the cost table) and the
paths recorded in summary.json's ``context`` (the worst-case overlays), so ``nnunet-dino benchmark --from-cases``
rebuilds the same report from those files.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pandas as pd

from nnunet_dino.evaluation.learning_curve import CURVE_SPLITS, curve_section, curve_tables
from nnunet_dino.evaluation.stats import compare_to_baseline, describe, empty_counts, mean_ranks, summarise
from nnunet_dino.evaluation.tables import fmt, markdown_table, p_value

SPLIT_TITLES = {"cv": "Cross-validation (nnU-Net's folds)", "test": "Test set (each trainer's fold ensemble)"}


def _split_section(cases: pd.DataFrame, split: str, baseline: str, seed: int, plots: dict) -> list[str]:
    part = cases[cases.split == split]
    n_cases = part[["fold", "case"]].drop_duplicates().shape[0]
    tol = ", ".join(f"{c} {t:g} mm" for c, t in part.groupby("class", sort=False)["tolerance_mm"].first().items())
    lines = [f"## {SPLIT_TITLES[split]}", "", f"{n_cases} cases per trainer; NSD tolerance: {tol}.", ""]
    classes, trainers = list(dict.fromkeys(part["class"])), list(dict.fromkeys(part["trainer"]))
    desc = describe(part).sort_values(["class", "trainer"], key=lambda col: col.map(
        {v: i for i, v in enumerate(classes if col.name == "class" else trainers)}), kind="stable")
    ranks = mean_ranks(part, "dice").set_index(["class", "trainer"])["mean_rank"]
    rows = [[r["class"], r["trainer"] + (" (baseline)" if r["trainer"] == baseline else ""),
             f"{fmt(r['dice_mean'])} ± {fmt(r['dice_std'])} ({fmt(r['dice_median'])})",
             f"{fmt(r['nsd_mean'])} ± {fmt(r['nsd_std'])}",
             f"{fmt(r['hd95_mm_mean'], 2)} ({fmt(r['hd95_mm_median'], 2)})",
             fmt(r["masd_mm_mean"], 2), fmt(ranks.get((r["class"], r["trainer"]), math.nan), 2)]
            for _, r in desc.iterrows()]
    lines += ["### Per trainer", ""] + markdown_table(
        ["Class", "Trainer", "Dice mean ± sd (median)", "NSD mean ± sd", "HD95 mm mean (median)", "MASD mm",
         "Mean rank (Dice)"], rows) + [""]
    cmp = compare_to_baseline(part, baseline, seed=seed)
    rows = [[r["class"], r["trainer"], r["metric"], f"{fmt(r['mean_diff'])} [{fmt(r['mean_diff_ci'][0])}, "
             f"{fmt(r['mean_diff_ci'][1])}]", f"{fmt(r['median_diff'])} [{fmt(r['median_diff_ci'][0])}, "
             f"{fmt(r['median_diff_ci'][1])}]", p_value(r["p_wilcoxon"]), p_value(r["p_holm"]),
             f"{r['wins']}/{r['ties']}/{r['losses']}"] for _, r in cmp.iterrows()]
    lines += [f"### Versus the baseline ({baseline}), paired per case", "",
              "Δ = trainer − baseline (for HD95 and MASD a negative Δ is better); 95 % bootstrap CIs; Wilcoxon "
              "signed-rank p, Holm-corrected over classes and trainers; W/T/L = cases better/equal/worse.", ""]
    lines += markdown_table(["Class", "Trainer", "Metric", "Δ mean [95 % CI]", "Δ median [95 % CI]", "p", "p (Holm)",
                     "W/T/L"], rows) + [""]
    if split == "cv":
        per_fold = part.groupby(["class", "trainer", "fold"], sort=False)["dice"].mean().unstack("fold")
        rows = [[c, t] + [fmt(v) for v in vals] for (c, t), vals in zip(per_fold.index, per_fold.to_numpy())]
        header = ["Class", "Trainer"] + [f"fold {f}" for f in per_fold.columns]
        lines += ["### Dice per fold", ""] + markdown_table(header, rows) + [""]
    empties = empty_counts(part)
    if empties[["both_empty", "only_ref_empty", "only_pred_empty"]].to_numpy().any():
        rows = [[r["class"], r["trainer"], str(r["both_empty"]), str(r["only_ref_empty"]), str(r["only_pred_empty"])]
                for _, r in empties.iterrows()]
        lines += ["### Empty masks (see Conventions)", ""] + markdown_table(
            ["Class", "Trainer", "both empty", "reference empty only", "prediction empty only"], rows) + [""]
    for title, path in plots.items():
        lines += [f"![{title}]({path})", ""]
    return lines


def _cost_section(costs: pd.DataFrame) -> list[str]:
    if costs.empty:
        return []
    agg = costs.groupby("trainer", sort=False).agg(
        folds=("fold", "count"), epochs=("epochs", "mean"), epoch_time_s=("epoch_time_s", "mean"),
        train_time_s=("train_time_s", "mean"), inference=("inference_s_per_case", "first"),
        trainable=("trainable_params_m", "first"), frozen=("frozen_params_m", "first"),
        peak=("peak_gpu_gib", "max"))
    rows = [[t, str(r.folds), fmt(r.epochs, 0), fmt(r.epoch_time_s, 1), fmt(r.train_time_s / 60, 1),
             fmt(r.inference, 2), fmt(r.trainable, 2), fmt(r.frozen, 2), fmt(r.peak, 2)]
            for t, r in zip(agg.index, agg.itertuples(), strict=True)]
    return ["## Cost (from the training checkpoints and logs)", ""] + markdown_table(
        ["Trainer", "Folds", "Epochs", "Epoch s", "Training min per fold", "Test inference s/case",
         "Trainable M", "Frozen M", "Peak GPU GiB"], rows) + [
        "", "Test inference time is the wall time of nnUNetv2_predict (model loading included) divided by the cases; "
            "peak GPU memory is logged by this package's trainers (stock nnU-Net trainers do not log it).", ""]


CONVENTIONS = """## Conventions

- Metrics per case and class on the full predicted volume, in physical units from the image spacing nnU-Net reads.
  Dice; NSD = share of boundary voxels of either mask within the tolerance of the other's boundary; HD95 = the
  larger of the two directed 95th percentiles of boundary distances; MASD = mean of all boundary distances in both
  directions (MONAI's surface distances).
- Empty masks: both empty -> Dice 1, NSD 1, HD95 = MASD = 0; one empty -> Dice 0, NSD 0, HD95 = MASD = the
  image's diagonal in mm. Every such case stays in the statistics and is counted above.
- Everything here is recomputable from cases.csv (`nnunet-dino benchmark --from-cases cases.csv -o DIR`).
"""


def _plots(cases: pd.DataFrame, split: str, baseline: str, out: Path, context: dict) -> dict:
    from nnunet_dino.evaluation.report_plots import distribution_plot, paired_plot, worst_case_overlays

    part = cases[cases.split == split]
    plots = {"Dice and NSD per case": distribution_plot(part, out / f"distributions_{split}.png"),
             "Paired differences against the baseline": paired_plot(part, baseline, out / f"paired_{split}.png")}
    for i, path in enumerate(worst_case_overlays(part, split, context, out)):
        plots[f"Worst case {i + 1}"] = path
    return {k: Path(v).relative_to(out).as_posix() for k, v in plots.items() if v is not None}


def to_html(markdown: str, title: str) -> str:
    """The report's markdown subset (headings, tables, images, paragraphs, bullets) as a standalone page."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set(line) <= set("|-"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells)
                        + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img src="{html.escape(src[:-1])}" alt="{html.escape(alt)}" style="max-width:100%"></p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:2px 6px}"
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"


def write_report(cases: pd.DataFrame, costs: pd.DataFrame, context: dict, out: Path, baseline: str,
                 seed: int = 0) -> Path:
    """summary.json, report.md, report.html and the plots into ``out``, from the tables alone."""
    from nnunet_dino.evaluation.stats import json_safe
    from nnunet_dino.files import atomic_write_json, atomic_write_text

    curve = cases.split.isin(list(CURVE_SPLITS))
    summary = summarise(cases[~curve], baseline, seed) if (~curve).any() else {
        "baseline": baseline, "trainers": list(dict.fromkeys(cases["trainer"]))}
    summary |= {"costs": json_safe(costs.to_dict(orient="records")), "context": context}
    curves = curve_tables(cases, baseline, seed)
    if curves:
        summary["label_efficiency"] = {s: {"points": json_safe(points.to_dict(orient="records")),
                                           "versus_baseline": json_safe(cmp.to_dict(orient="records"))}
                                       for s, (points, cmp) in curves.items()}
    atomic_write_json(json_safe(summary), out / "summary.json")
    title = f"Benchmark: {context.get('dataset', '?')} ({context.get('configuration', '?')}, folds " \
            f"{' '.join(map(str, context.get('folds', [])))})"
    lines = [f"# {title}", "", f"Baseline: {baseline}. Trainers: {', '.join(summary['trainers'])}.", ""]
    for split in [s for s in SPLIT_TITLES if s in set(cases.split)]:
        lines += _split_section(cases, split, baseline, seed, _plots(cases, split, baseline, out, context))
    if curves:
        lines += curve_section(curves, list(dict.fromkeys(cases["trainer"])), costs, baseline, out)
    lines += _cost_section(costs) + CONVENTIONS.splitlines()
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", to_html(text, title))
    return out / "report.md"


def _needed_bytes(cases: pd.DataFrame) -> int:
    """A generous estimate of what the report takes on disk: tables, plots and overlays."""
    return 32 * 2**20 + 2048 * len(cases)


def write_outputs(cases: pd.DataFrame, costs: pd.DataFrame, context: dict, folder, baseline: str,
                  seed: int = 0, keep: tuple[str, ...] = ()) -> Path:
    """cases.csv, costs.csv and the report into ``folder`` (a ``files.OutputFolder``): all of it or nothing."""
    cases = cases[["split", "fold", "case", "class", "trainer"] + [c for c in cases.columns if c not in
                                                                    ("split", "fold", "case", "class", "trainer")]]

    def build(stage: Path) -> None:
        cases.to_csv(stage / "cases.csv", index=False)
        costs.to_csv(stage / "costs.csv", index=False)
        write_report(read_cases(stage / "cases.csv"), costs, context, stage, baseline, seed)

    folder.write(build, keep=keep, needed_bytes=_needed_bytes(cases))
    return folder.path / "report.md"


CASES_COLUMNS = ("split", "fold", "case", "trainer", "class", "dice", "nsd")  # what the report reads


def read_cases(path: Path) -> pd.DataFrame:
    """cases.csv as written (fold stays a string: "0".."4" or "ensemble")."""
    return pd.read_csv(path, dtype={"fold": str, "case": str, "labelled": str})


def report_from_cases(cases_csv: Path, out: Path, baseline: str | None = None, seed: int = 0,
                      force: bool = False) -> Path:
    """Rebuild summary.json, the report and the plots from a benchmark's cases.csv (+ costs.csv, context)."""
    from nnunet_dino.errors import DinoUNetError
    from nnunet_dino.files import OutputFolder

    if not cases_csv.is_file():
        raise DinoUNetError(f"{cases_csv} does not exist; pass the cases.csv a benchmark wrote.")
    try:
        cases = read_cases(cases_csv)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        raise DinoUNetError(f"{cases_csv} is not a cases.csv a benchmark wrote ({type(e).__name__}); pass that "
                            f"file.") from None
    missing = sorted(set(CASES_COLUMNS) - set(cases.columns))
    if missing or cases.empty:
        raise DinoUNetError(f"{cases_csv} is not a cases.csv a benchmark wrote ("
                            f"{'no rows' if not missing else 'no column ' + ', '.join(missing)}); pass that file.")
    costs_file, summary_file = cases_csv.with_name("costs.csv"), cases_csv.with_name("summary.json")
    costs = pd.read_csv(costs_file, dtype={"labelled": str}) if costs_file.is_file() else pd.DataFrame()
    old = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    baseline = baseline or old.get("baseline") or cases["trainer"].iloc[0]
    folder = OutputFolder(out, "benchmark", force=force)
    keep = ("test_predictions",) if folder.owns("test_predictions") else ()
    return write_outputs(cases, costs, old.get("context", {}), folder, baseline, seed, keep=keep)

