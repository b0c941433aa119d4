"""Label-efficiency folds for ``nnunet-dino benchmark --labelled``: how each trainer does with N labelled cases.

For each requested (source) fold, size N and repeat, a seeded subset of N of that fold's training cases becomes an
extra fold appended to the dataset's ``splits_final.json`` -- stock ``nnUNetv2_train`` trains any fold index the file
lists -- validated on the source fold's full validation cases. The subsets of one repeat are nested (the 5 hold the
2) and every trainer trains on the same ones, so the curve is about the trainers, not about which cases were drawn.
The user's own folds are never changed. The sidecar ``splits_label_efficiency.json`` records the user's folds and
every added fold (source fold, N, repeat, seed, cases), so reruns reuse them and a splits file that changed under
them is refused instead of silently mixing subsets of different splits.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_dino.errors import DinoUNetError

SIDECAR = "splits_label_efficiency.json"
ALL = "all"  # the "all labelled cases" point: the source fold itself


@dataclass(frozen=True)
class Subset:
    """One added fold: ``n_labelled`` of ``source_fold``'s training cases (repeat ``repeat`` of seed ``seed``)."""
    fold: int
    source_fold: int
    n_labelled: int
    repeat: int
    seed: int
    train: tuple[str, ...]

    def key(self) -> tuple[int, int, int, int]:
        return self.source_fold, self.n_labelled, self.repeat, self.seed

    def record(self) -> dict:
        return {"fold": self.fold, "source_fold": self.source_fold, "n_labelled": self.n_labelled,
                "repeat": self.repeat, "seed": self.seed, "train": list(self.train)}


def parse_sizes(values: Sequence[str]) -> list[int | str]:
    """``--labelled`` values: positive integers and/or "all", each once, ascending with "all" last."""
    sizes: list[int | str] = []
    for value in values:
        item: int | str = ALL if str(value).lower() == ALL else -1
        if item != ALL:
            try:
                item = int(value)
            except ValueError:
                item = -1
            if item < 1:
                raise DinoUNetError(f"--labelled takes numbers of labelled cases (positive integers) and/or 'all', "
                                    f"e.g. --labelled 5 10 20 all; got {value!r}.")
        if item in sizes:
            raise DinoUNetError(f"--labelled names {value} twice; name each size once.")
        sizes.append(item)
    return sorted(sizes, key=lambda s: (s == ALL, s if s != ALL else 0))


def draw_order(train: Sequence[str], source_fold: int, repeat: int, seed: int) -> list[str]:
    """A seeded order of a fold's training cases; the first N of one order are the subset of size N (nested)."""
    return [str(c) for c in np.random.default_rng([seed, source_fold, repeat]).permutation(sorted(train))]


def default_splits(dataset) -> list[dict]:
    """The 5 folds nnUNetv2_train would write for a dataset without splits_final.json (same function, same seed)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ending = dataset.file_ending
    cases = sorted(p.name[: -len(ending)] for p in (dataset.preprocessed / "gt_segmentations").glob(f"*{ending}"))
    if len(cases) < 5:
        raise DinoUNetError(f"{dataset.preprocessed / 'gt_segmentations'} holds {len(cases)} cases; run "
                            f"nnUNetv2_plan_and_preprocess first (5-fold cross-validation needs at least 5).")
    return generate_crossval_split(cases, seed=12345, n_splits=5)


@dataclass
class CurvePlan:
    """The subset folds a benchmark run needs, and what must be written for them (nothing on a rerun)."""
    splits_file: Path
    sidecar_file: Path
    sizes: list[int | str]
    source_folds: list[int]
    repeats: int
    seed: int
    splits: list[dict]            # the whole splits file as it will be (user folds + every recorded subset)
    user_folds: int
    subsets: list[Subset]         # this run's subsets
    recorded: list[Subset] = field(default_factory=list)  # every subset in the sidecar, this run's new ones included
    changed: bool = False

    @property
    def with_all(self) -> bool:
        return ALL in self.sizes

    @property
    def subset_folds(self) -> list[int]:
        return [s.fold for s in self.subsets]

    def labelled_of_fold(self) -> dict[int, str]:
        """fold index -> "N" or "all" for every fold this run scores."""
        out = {s.fold: str(s.n_labelled) for s in self.subsets}
        return out | ({f: ALL for f in self.source_folds} if self.with_all else {})

    def write(self) -> None:
        """The sidecar first (it names the folds about to exist), then splits_final.json in nnU-Net's own format
        (json, sorted keys, indent 4) so the user's folds keep their exact text."""
        from nnunet_dino.files import atomic_write_text

        if not self.changed:
            return
        user = self.splits[: self.user_folds]
        atomic_write_text(self.sidecar_file, json.dumps({
            "written_by": "nnunet-dino benchmark --labelled",
            "about": f"folds {self.user_folds} and later of splits_final.json are label-efficiency subsets of the "
                     f"user's folds 0-{self.user_folds - 1}; each entry below says which",
            "user_folds": self.user_folds, "user_splits": user,
            "subsets": [s.record() for s in self.recorded]}, indent=2) + "\n")
        atomic_write_text(self.splits_file, json.dumps(self.splits, sort_keys=True, indent=4))
        self.changed = False

    def describe(self) -> dict:
        return {"sizes": [str(s) for s in self.sizes], "source_folds": self.source_folds, "repeats": self.repeats,
                "seed": self.seed, "sidecar": str(self.sidecar_file),
                "subsets": [{k: v for k, v in s.record().items() if k != "train"} for s in self.subsets]}


def _sidecar_error(sidecar_file: Path, what: str) -> DinoUNetError:
    return DinoUNetError(f"{sidecar_file} {what}; restore it, or move it aside to start new subsets (the folds it "
                         f"named then stay in splits_final.json unused).")


def _recorded(sidecar_file: Path, splits_file: Path, splits: list[dict]) -> tuple[int, list[Subset], list[dict]]:
    """(user folds, recorded subsets, splits completed with recorded folds a crash left unwritten), checked. The
    number of labelled cases is the fold's own in the splits file; the sidecar's count is only a cross-check."""
    from nnunet_dino.files import read_json_object

    record = read_json_object(sidecar_file)
    try:
        user_folds, user = int(record["user_folds"]), list(record["user_splits"])
        recorded = [Subset(int(r["fold"]), int(r["source_fold"]), int(r["n_labelled"]), int(r["repeat"]),
                           int(r["seed"]), tuple(str(c) for c in r["train"])) for r in record["subsets"]]
    except (TypeError, KeyError, ValueError):
        raise _sidecar_error(sidecar_file, "is not the JSON record nnunet-dino benchmark --labelled writes") from None
    if splits[:user_folds] != user:
        raise DinoUNetError(
            f"{splits_file}'s folds 0-{user_folds - 1} differ from the ones {sidecar_file.name} recorded when the "
            f"label-efficiency folds were added; those folds and their trained fold_N folders belong to the old "
            f"splits: restore the old splits_final.json, or move {sidecar_file.name} aside to start new subsets.")
    splits = list(splits)
    for s in sorted(recorded, key=lambda s: s.fold):
        if not 0 <= s.source_fold < user_folds:
            raise _sidecar_error(sidecar_file, f"names source fold {s.source_fold}, not one of the user's folds")
        entry = {"train": list(s.train), "val": user[s.source_fold]["val"]}
        if s.fold == len(splits):  # recorded, but the splits file was not written after it
            splits.append(entry)
        elif s.fold > len(splits) or splits[s.fold] != entry:
            raise DinoUNetError(
                f"Fold {s.fold} of {splits_file} is not the label-efficiency subset {sidecar_file.name} recorded "
                f"for it (fold {s.source_fold}, {len(s.train)} cases, repeat {s.repeat}); the file was edited: "
                f"restore it, or move {sidecar_file.name} aside to start new subsets.")
        if s.n_labelled != len(splits[s.fold]["train"]):
            raise _sidecar_error(sidecar_file, f"says fold {s.fold} has {s.n_labelled} labelled cases but "
                                               f"splits_final.json lists {len(splits[s.fold]['train'])} for it")
    return user_folds, recorded, splits


def read_splits(splits_file: Path) -> list[dict] | None:
    """splits_final.json as nnU-Net reads it (a list of {train, val}); None when absent; one line when unreadable."""
    if not splits_file.is_file():
        return None
    try:
        splits = json.loads(splits_file.read_text())
        if not all(isinstance(f, dict) and isinstance(f["train"], list) and isinstance(f["val"], list)
                   for f in splits) or not isinstance(splits, list):
            raise ValueError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise DinoUNetError(f"{splits_file} is not a readable nnU-Net splits file (a JSON list of {{train, val}}); "
                            f"restore it, or move it aside and let nnUNetv2_train write a new one.") from None
    return splits


class SplitsLock:
    """An exclusive lock on a dataset's splits file for the read-append-write of --labelled: a second run at the
    same time is refused naming the first one's PID, so two runs never claim the same fold index."""

    def __init__(self, preprocessed: Path):
        self.file = Path(preprocessed) / ".splits_final.json.nnunet-dino-lock"
        self.handle = None

    def __enter__(self) -> SplitsLock:
        import fcntl
        import os

        try:
            self.handle = open(self.file, "a+")
        except OSError as e:
            raise DinoUNetError(f"Cannot create the lock file {self.file} ({e.strerror}); the dataset's preprocessed "
                                f"folder must be writable for --labelled.") from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise DinoUNetError(f"Another nnunet-dino benchmark --labelled (PID {holder}) is adding folds to "
                                f"{self.file.parent / 'splits_final.json'}; wait for it to finish, then rerun "
                                f"(it reuses every fold the other one adds).") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def check_trained_on(models, plan: CurvePlan) -> None:
    """Before scoring: each trained subset fold was trained on the cases its split lists now. Our trainers record
    them in costs.json; for others nnU-Net's training log gives the count. A mismatch is refused, naming the fold."""
    from nnunet_dino.nnunet.costs import read_costs

    for s in plan.subsets:
        expected = sorted(plan.splits[s.fold]["train"])
        for m in models:
            folder = m.fold_dir(s.fold)
            if not (folder / "checkpoint_final.pth").is_file():
                continue
            costs = read_costs(folder) or {}
            cases = costs.get("training_cases")
            trained = len(cases) if isinstance(cases, list) else logged_training_count(folder)
            if (isinstance(cases, list) and sorted(map(str, cases)) != expected) or \
                    (trained is not None and trained != len(expected)):
                raise DinoUNetError(
                    f"{m.trainer} fold {s.fold} was trained on {trained} cases, not the {len(expected)} that "
                    f"splits_final.json lists for it now (an older subset): move {folder} aside and rerun with "
                    f"--train-missing to retrain it.")


def logged_training_count(fold_dir: Path) -> int | None:
    """The training-case count nnU-Net logged for this fold's last run ("This split has N training ..."), if any."""
    import re

    count = None
    for log in sorted(fold_dir.glob("training_log_*.txt")):
        found = re.findall(r"This split has (\d+) training and \d+ validation cases", log.read_text(errors="replace"))
        count = int(found[-1]) if found else count
    return count


def plan_curve(dataset, folds: Sequence[int], sizes: Sequence[int | str], repeats: int, seed: int) -> CurvePlan:
    """Validate the request and decide every subset fold (reusing recorded ones); writes nothing."""
    if repeats < 1:
        raise DinoUNetError(f"--repeats must be at least 1; got {repeats}.")
    splits_file, sidecar_file = dataset.preprocessed / "splits_final.json", dataset.preprocessed / SIDECAR
    if splits_file.is_symlink():
        from shlex import quote

        raise DinoUNetError(f"{splits_file} is a link; --labelled appends folds to it and will not write through a "
                            f"link: replace it with a copy of its target (cp --remove-destination "
                            f"\"$(readlink -f {quote(str(splits_file))})\" {quote(str(splits_file))}).")
    splits = read_splits(splits_file) or default_splits(dataset)  # read now: another run may have added folds
    changed = not splits_file.is_file()
    if sidecar_file.is_file():
        user_folds, recorded, completed = _recorded(sidecar_file, splits_file, splits)
        changed |= completed != splits
        splits = completed
    else:
        user_folds, recorded = len(splits), []
    by_key = {s.key(): s for s in recorded}
    subsets = []
    for fold in folds:
        if not 0 <= fold < user_folds:
            raise DinoUNetError(f"--folds {fold}: label-efficiency subsets are drawn from your own folds "
                                f"(0-{user_folds - 1} in {splits_file}); choose --folds from those.")
        train = splits[fold]["train"]
        too_big = [n for n in sizes if n != ALL and n >= len(train)]
        if too_big:
            raise DinoUNetError(f"--labelled {too_big[0]}: fold {fold} has {len(train)} training cases, so a subset "
                                f"must be smaller than {len(train)}; use 'all' for the whole fold.")
        for repeat in range(repeats):
            order = draw_order(train, fold, repeat, seed)
            for n in (n for n in sizes if n != ALL):
                subset = by_key.get((fold, n, repeat, seed))
                if subset is None:
                    subset = Subset(len(splits), fold, n, repeat, seed, tuple(sorted(order[:n])))
                    splits.append({"train": list(subset.train), "val": splits[fold]["val"]})
                    recorded.append(subset)
                    by_key[subset.key()] = subset
                    changed = True
                subsets.append(subset)
    return CurvePlan(splits_file, sidecar_file, list(sizes), list(folds), repeats, seed, splits, user_folds, subsets,
                     recorded, changed)


def label_rows(rows: list[dict], plan: CurvePlan, ensemble_folds: Sequence[int]) -> list[dict]:
    """Scored rows with the curve's columns: ``labelled`` ("N"/"all"), ``n_labelled`` (the cases trained on),
    ``repeat`` and ``source_fold``; subset folds become split "curve" (validation) / "curve_test" (test set). The
    "all" point of the test curve is each source fold's own model; with one source fold that is the ensemble."""
    subsets = {s.fold: s for s in plan.subsets}
    out = []
    for row in rows:
        fold = row["fold"]
        index = int(fold) if str(fold).isdigit() else None
        extra = {"labelled": None, "n_labelled": None, "repeat": None, "source_fold": None}
        if index in subsets:
            s = subsets[index]
            extra = {"labelled": str(s.n_labelled), "n_labelled": s.n_labelled, "repeat": s.repeat,
                     "source_fold": s.source_fold}
            row = row | {"split": "curve" if row["split"] == "cv" else "curve_test"}
        elif plan.with_all and index is not None and index in plan.source_folds:
            extra = {"labelled": ALL, "n_labelled": len(plan.splits[index]["train"]), "repeat": 0,
                     "source_fold": index}
        out.append(row | extra)
        if row["split"] == "test" and plan.with_all and len(ensemble_folds) == 1:
            f = ensemble_folds[0]
            out.append(row | {"split": "curve_test", "fold": str(f), "labelled": ALL,
                              "n_labelled": len(plan.splits[f]["train"]), "repeat": 0, "source_fold": f})
    return out


def test_fold_groups(plan: CurvePlan | None, folds: Sequence[int]) -> dict[str, list[int]]:
    """What to predict on the test set: the ensemble of the user's folds (the "all" point when there is one source
    fold), and each subset fold alone (each source fold alone too when there are several)."""
    groups = {"ensemble": list(folds)} if plan is None or plan.with_all else {}
    if plan is not None:
        singles = plan.subset_folds + (list(folds) if plan.with_all and len(folds) > 1 else [])
        groups |= {str(f): [f] for f in singles}
    return groups
