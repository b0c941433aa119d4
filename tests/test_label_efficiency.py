"""Label-efficiency folds (benchmark --labelled): the subsets, the splits file and its sidecar, the report."""
import json
import shutil

import pandas as pd
import pytest

from nnunet_dino.errors import DinoUNetError


def _dataset(root=None):
    from nnunet_dino.evaluation.benchmark import find_dataset

    return find_dataset("321")


def test_subsets_are_nested_seeded_shared_and_the_user_folds_keep_their_text(fake_env):
    from nnunet_dino.evaluation.label_efficiency import SIDECAR, plan_curve

    root = fake_env({"base": 0}, n_cases=12)
    splits_file = root / "pre" / "Dataset321_Fake" / "splits_final.json"
    user = json.loads(splits_file.read_text())
    from batchgenerators.utilities.file_and_folder_operations import save_json

    save_json(user, str(splits_file))  # as nnUNetv2_train writes it
    before = splits_file.read_text()
    plan = plan_curve(_dataset(root), [0, 1], [2, 4, "all"], repeats=2, seed=0)
    assert len(plan.subsets) == 2 * 2 * 2 and plan.subset_folds == list(range(2, 10))
    plan.write()
    after = json.loads(splits_file.read_text())
    assert after[:2] == user and splits_file.read_text().startswith(before.rstrip().rstrip("]").rstrip())
    for s in plan.subsets:
        train = set(after[s.fold]["train"])
        assert len(train) == s.n_labelled and train <= set(user[s.source_fold]["train"])
        assert after[s.fold]["val"] == user[s.source_fold]["val"]
    by = {(s.source_fold, s.repeat, s.n_labelled): set(s.train) for s in plan.subsets}
    assert all(by[(f, r, 2)] < by[(f, r, 4)] for f in (0, 1) for r in (0, 1))   # nested
    assert by[(0, 0, 4)] != by[(0, 1, 4)]                                        # repeats draw anew
    sidecar = json.loads((splits_file.parent / SIDECAR).read_text())
    assert sidecar["user_folds"] == 2 and sidecar["user_splits"] == user and len(sidecar["subsets"]) == 8
    # a rerun reuses every fold and writes nothing; more repeats append after them
    mtime = splits_file.stat().st_mtime_ns
    again = plan_curve(_dataset(root), [0, 1], [2, 4, "all"], repeats=2, seed=0)
    assert not again.changed and [s.fold for s in again.subsets] == plan.subset_folds
    again.write()
    assert splits_file.stat().st_mtime_ns == mtime
    more = plan_curve(_dataset(root), [0], [2, 4], repeats=3, seed=0)
    assert more.subset_folds[:4] == [2, 3, 4, 5] and more.subset_folds[4:] == [10, 11]


def test_a_crash_between_the_two_writes_is_completed_on_the_rerun(fake_env):
    from nnunet_dino.evaluation.label_efficiency import plan_curve

    root = fake_env({"base": 0}, n_cases=12)
    splits_file = root / "pre" / "Dataset321_Fake" / "splits_final.json"
    user_text = splits_file.read_text()
    plan = plan_curve(_dataset(root), [0], [2], repeats=1, seed=0)
    plan.write()
    splits_file.write_text(user_text)  # as if the process died after the sidecar
    again = plan_curve(_dataset(root), [0], [2], repeats=1, seed=0)
    assert again.changed and again.subset_folds == [2]
    again.write()
    assert json.loads(splits_file.read_text())[2]["train"] == list(plan.subsets[0].train)


@pytest.mark.parametrize("request_, message", [
    (dict(sizes=[6]), "--labelled 6: fold 0 has 6 training cases, so a subset must be smaller than 6; use 'all'"),
    (dict(folds=[5]), "--folds 5: label-efficiency subsets are drawn from your own folds (0-1 in"),
    (dict(repeats=0), "--repeats must be at least 1"),
])
def test_impossible_requests_are_refused(fake_env, request_, message):
    from nnunet_dino.evaluation.label_efficiency import plan_curve

    root = fake_env({"base": 0}, n_cases=12)
    kw = dict(folds=[0], sizes=[2], repeats=1, seed=0) | request_
    with pytest.raises(DinoUNetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_curve(_dataset(root), kw["folds"], kw["sizes"], kw["repeats"], kw["seed"])


@pytest.mark.parametrize("values, message", [(["0"], "positive integers"), (["x"], "got 'x'"),
                                             (["5", "5"], "names 5 twice")])
def test_sizes_are_checked(values, message):
    from nnunet_dino.evaluation.label_efficiency import parse_sizes

    assert parse_sizes(["all", "10", "2"]) == [2, 10, "all"]
    with pytest.raises(DinoUNetError, match=message):
        parse_sizes(values)


def test_changed_user_folds_or_an_edited_subset_fold_are_refused(fake_env):
    from nnunet_dino.evaluation.label_efficiency import plan_curve

    root = fake_env({"base": 0}, n_cases=12)
    splits_file = root / "pre" / "Dataset321_Fake" / "splits_final.json"
    plan_curve(_dataset(root), [0], [2], repeats=1, seed=0).write()
    splits = json.loads(splits_file.read_text())
    edited = [dict(splits[0], val=splits[0]["val"][:-1])] + splits[1:]
    splits_file.write_text(json.dumps(edited))
    with pytest.raises(DinoUNetError, match="folds 0-1 differ from the ones splits_label_efficiency.json recorded"):
        plan_curve(_dataset(root), [0], [2], repeats=1, seed=0)
    splits_file.write_text(json.dumps(splits[:2] + [dict(splits[2], train=splits[2]["train"][:1])]))
    with pytest.raises(DinoUNetError, match="Fold 2 of .* is not the label-efficiency subset"):
        plan_curve(_dataset(root), [0], [2], repeats=1, seed=0)


def test_the_command_scores_each_size_and_writes_the_learning_curve(fake_env, capsys):
    """Validations for the subset folds are written by hand (a copy of the source fold's, shifted less with more
    labels), so the whole command runs in seconds; the e2e test trains them through nnUNetv2_train."""
    from nnunet_dino.commands.cli import main
    from nnunet_dino.evaluation.label_efficiency import plan_curve
    from nnunet_dino.evaluation.report import read_cases

    root = fake_env({"base": 0, "worse": 2}, n_cases=12)
    plan = plan_curve(_dataset(root), [0], [2, 4], repeats=2, seed=0)
    plan.write()
    for trainer in ("base", "worse"):
        model = root / "res" / "Dataset321_Fake" / f"{trainer}__nnUNetPlans__2d"
        for s in plan.subsets:
            shutil.copytree(model / "fold_0", model / f"fold_{s.fold}")
    out = root / "curve"
    assert main(["benchmark", "-d", "321", "--trainers", "base", "worse", "--folds", "0", "--labelled", "2", "4",
                 "all", "--repeats", "2", "-o", str(out)]) == 0
    cases = read_cases(out / "cases.csv")
    assert set(cases.split) == {"cv", "curve"} and set(cases.labelled) == {"2", "4", "all"}
    curve = cases[cases.split == "curve"]
    assert len(curve) == 2 * 2 * 2 * 6 * 2 and set(curve.repeat) == {0, 1}   # sizes, repeats, trainers, cases, classes
    assert (cases[cases.labelled == "all"].n_labelled == 6).all()
    summary = json.loads((out / "summary.json").read_text())
    points = pd.DataFrame(summary["label_efficiency"]["curve"]["points"])
    assert list(dict.fromkeys(points.labelled)) == ["2", "4", "all"]
    assert (points[points.trainer == "base"].dice_mean == 1).all() and points.repeats.max() == 2
    vs = pd.DataFrame(summary["label_efficiency"]["curve"]["versus_baseline"])
    assert len(vs) == 3 * 2 * 2 and (vs[(vs.metric == "dice") & (vs["class"] == "organ")].losses == 6).all()
    assert {r["split"] for r in summary["versus_baseline"]} == {"cv"}   # the curve stays out of the CV tables
    report = (out / "report.md").read_text()
    assert "## Label efficiency: validation cases of the source folds" in report
    assert "| organ | base (baseline) | 1.000" in report and "### Training minutes per run at each N" in report
    assert (out / "learning_curve_curve.png").stat().st_size > 1000
    assert summary["context"]["label_efficiency"]["subsets"][0] == {"fold": 2, "source_fold": 0, "n_labelled": 2,
                                                                     "repeat": 0, "seed": 0}
    # the report is rebuilt from cases.csv alone, curve included
    again = root / "again"
    assert main(["benchmark", "--from-cases", str(out / "cases.csv"), "-o", str(again)]) == 0
    assert "## Label efficiency" in (again / "report.md").read_text()


def test_one_trainer_under_two_plans_is_compared_by_trainer_and_plans(fake_env):
    from nnunet_dino.evaluation.benchmark import find_models

    root = fake_env({"base": 0})
    models = find_models(_dataset(root), ["base", "dino", "dino"], ["nnUNetPlans", "pre", "rand"], "2d")
    assert [m.name for m in models] == ["base", "dino__pre", "dino__rand"]
    with pytest.raises(DinoUNetError, match="names a trainer twice with the same plans"):
        find_models(_dataset(root), ["base", "base"], ["nnUNetPlans"], "2d")


def test_the_command_compares_one_trainer_under_two_plans_pretrained_vs_random(fake_env, capsys):
    """The encoder study's comparison: the same trainer with random and with pretrained weights (two plans); the
    baseline is named trainer__plans in the report as everywhere else."""
    from nnunet_dino.commands.cli import main

    root = fake_env({"base": 0}, n_cases=12)
    res = root / "res" / "Dataset321_Fake"
    shutil.copytree(res / "base__nnUNetPlans__2d", res / "base__nnUNetPlans_random__2d")
    assert main(["benchmark", "-d", "321", "--trainers", "base", "base", "-p", "nnUNetPlans_random", "nnUNetPlans",
                 "--folds", "0", "1", "-o", str(root / "out")]) == 0
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["baseline"] == "base__nnUNetPlans_random"
    assert {r["trainer"] for r in summary["versus_baseline"]} == {"base__nnUNetPlans"}


def test_the_test_set_curve_predicts_each_subset_model_and_reuses_a_single_folds_ensemble(fake_env):
    from nnunet_dino.evaluation.label_efficiency import label_rows, plan_curve, test_fold_groups

    root = fake_env({"base": 0}, n_cases=12)
    plan = plan_curve(_dataset(root), [0], [2, "all"], repeats=2, seed=0)
    assert test_fold_groups(None, [0, 1]) == {"ensemble": [0, 1]}
    assert test_fold_groups(plan, [0]) == {"ensemble": [0], "2": [2], "3": [3]}
    two = plan_curve(_dataset(root), [0, 1], [2, "all"], repeats=1, seed=0)
    assert test_fold_groups(two, [0, 1]) == {"ensemble": [0, 1], "2": [2], "3": [3], "0": [0], "1": [1]}
    rows = [{"split": "test", "fold": "ensemble", "case": "t0"}, {"split": "curve_test", "fold": "3", "case": "t0"},
            {"split": "cv", "fold": 0, "case": "c0"}, {"split": "cv", "fold": 2, "case": "c0"}]
    out = label_rows(rows, plan, [0])
    assert [(r["split"], r["fold"], r["labelled"]) for r in out] == [
        ("test", "ensemble", None), ("curve_test", "0", "all"), ("curve_test", "3", "2"), ("cv", 0, "all"),
        ("curve", 2, "2")]
    assert out[2]["repeat"] == 1 and out[1]["n_labelled"] == 6
