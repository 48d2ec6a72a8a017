"""Label fractions: keep a fraction of the training CASES for label-efficiency studies.

Azizi et al. 2021 fine-tune on 10% .. 90% of the labelled training data. The
unit kept or dropped is the patient case, never an image: a patient whose
images were split between "kept" and "dropped" would leak, and MICLe's unit
is the case too. For multiclass tasks the selection is stratified by class,
so a 10% subset keeps every class's share; every subset is a pure function
of (case ids, labels, fraction, seed), and for one seed a smaller fraction's
cases are a subset of a larger fraction's (each class is a prefix of one
seeded permutation), so label-efficiency curves compare nested subsets.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np


def _as_str(case_id) -> str:
    return case_id.decode("utf-8") if isinstance(case_id, bytes) else str(case_id)


def case_labels(case_ids: Sequence, labels: Sequence[int] | None) -> dict[str, int]:
    """One label per case: the most frequent label of its images (ties: the smallest).

    Args:
      case_ids: [n] case id of every image (str or bytes); repeated ids are one case.
      labels: [n] integer class per image (-1 = none), or None (every case -1).

    Returns:
      {case id: label}, label -1 for a case none of whose images has a label.
    """
    if labels is not None and len(labels) != len(case_ids):
        raise ValueError(
            f"select_cases: {len(case_ids)} case ids but {len(labels)} labels; pass one "
            "label per image (or per case), aligned with case_ids"
        )
    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i, case_id in enumerate(case_ids):
        label = -1 if labels is None else int(labels[i])
        votes[_as_str(case_id)][label] += 1
    result = {}
    for case_id, counter in votes.items():
        labelled = {k: v for k, v in counter.items() if k >= 0}
        if not labelled:
            result[case_id] = -1
        else:
            top = max(labelled.values())
            result[case_id] = min(k for k, v in labelled.items() if v == top)
    return result


def _permutation(ids: list[str], seed: int, stratum: int) -> list[str]:
    # A per-(seed, stratum) generator: the order of one class does not depend on
    # which other classes exist, so adding a class never reshuffles the others.
    key = hashlib.sha256(f"{seed}/{stratum}".encode()).digest()
    rng = np.random.default_rng(np.frombuffer(key[:16], np.uint32))
    order = rng.permutation(len(ids))
    return [ids[i] for i in order]


def select_cases(
    case_ids: Sequence,
    labels: Sequence[int] | None,
    fraction: float,
    seed: int,
    stratify: bool,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """The training cases kept for a label fraction.

    Stratified (multiclass): each class keeps round(fraction * its cases); the
    cases without a label (-1) form their own stratum. Not stratified
    (multilabel, no labels): round(fraction * all cases). A positive count is
    never rounded down to 0, but a fraction so small that it still leaves a
    class (or the split) without a case is an error naming it.

    Args:
      case_ids: [n] case id per image (or per case), str or bytes.
      labels: [n] class index per image (-1 = none), or None.
      fraction: in (0, 1]; 1.0 keeps every case.
      seed: selects the subset; the same seed gives the same cases.
      stratify: keep each class's share (multiclass tasks).
      class_names: names for the error messages (index -> name).

    Returns:
      The kept case ids as sorted str.
    """
    if not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"config.data.label_fraction={fraction!r} must be in (0, 1]: e.g. 0.1 keeps 10% "
            "of the training cases, 1.0 keeps all of them"
        )
    per_case = case_labels(case_ids, labels)
    if not per_case:
        raise ValueError("label fraction: the training split has no cases")
    if fraction == 1.0:
        return sorted(per_case)
    strata: dict[int, list[str]] = collections.defaultdict(list)
    for case_id, label in sorted(per_case.items()):
        strata[label if stratify else 0].append(case_id)
    kept = []
    for stratum, ids in sorted(strata.items()):
        count = int(round(fraction * len(ids)))
        if count == 0:
            if stratify and stratum >= 0:
                name = (
                    class_names[stratum]
                    if class_names and stratum < len(class_names)
                    else f"class {stratum}"
                )
                raise ValueError(
                    f"config.data.label_fraction={fraction} leaves class {name!r} "
                    f"({len(ids)} training cases) without a case; use a fraction of at "
                    f"least {0.5 / len(ids):.3g} or more data"
                )
            if not stratify:
                raise ValueError(
                    f"config.data.label_fraction={fraction} leaves the training split "
                    f"({len(ids)} cases) empty; use a fraction of at least {0.5 / len(ids):.3g}"
                )
            continue  # unlabelled cases (-1): nothing to keep
        kept += _permutation(ids, seed, stratum)[:count]
    if not kept:
        raise ValueError(f"config.data.label_fraction={fraction} leaves the training split empty")
    return sorted(kept)


def images_per_class(
    case_ids: Sequence, labels: Sequence[int], num_classes: int, cases: Sequence[str] | None
) -> np.ndarray:
    """Labelled images per class of the images of `cases` (every image when None).

    Args:
      case_ids: [n] case id per image, str or bytes.
      labels: [n] class index per image (-1 = none).
      num_classes: C.
      cases: the case ids to count, as `select_cases` returns them, or None.

    Returns:
      int64 [C] image counts.
    """
    labels = np.asarray(labels)
    if cases is not None:
        keep = set(cases)
        labels = labels[np.array([_as_str(c) in keep for c in case_ids], bool)]
    labels = labels[labels >= 0]
    return np.bincount(labels, minlength=num_classes).astype(np.int64)
