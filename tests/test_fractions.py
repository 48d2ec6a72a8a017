"""Label fractions: patients never split, stratified, reproducible, nested, clear errors."""

import collections

import numpy as np
import pytest

from micle_jax import rundir
from micle_jax.data.stream import fractions


def make_cases(num_cases=200, num_classes=4, seed=0):
    """Per-image case ids and labels: 1-3 images per case, one class per case."""
    rng = np.random.default_rng(seed)
    case_ids, labels = [], []
    for c in range(num_cases):
        label = int(rng.integers(num_classes))
        for _ in range(int(rng.integers(1, 4))):
            case_ids.append(f"patient{c:04d}".encode())
            labels.append(label)
    order = rng.permutation(len(case_ids))  # images in any order
    return [case_ids[i] for i in order], [labels[i] for i in order]


def test_fraction_keeps_whole_cases_and_class_shares():
    case_ids, labels = make_cases()
    kept = fractions.select_cases(case_ids, labels, 0.3, seed=1, stratify=True)
    assert kept == sorted(set(kept)) and all(isinstance(k, str) for k in kept)
    per_case = fractions.case_labels(case_ids, labels)
    # Each class keeps round(0.3 * its cases): stratified.
    totals = collections.Counter(per_case.values())
    kept_counts = collections.Counter(per_case[k] for k in kept)
    for label, total in totals.items():
        assert kept_counts[label] == round(0.3 * total)
    # Every image of a kept case is kept (selection is by case, images follow).
    kept_images = [c for c in case_ids if c.decode() in set(kept)]
    for case in kept:
        assert kept_images.count(case.encode()) == case_ids.count(case.encode())


def test_fraction_is_reproducible_seeded_and_nested():
    case_ids, labels = make_cases()
    a = fractions.select_cases(case_ids, labels, 0.2, seed=3, stratify=True)
    shuffled = list(zip(case_ids, labels, strict=True))[::-1]
    b = fractions.select_cases([c for c, _ in shuffled], [lab for _, lab in shuffled], 0.2, 3, True)
    assert a == b  # independent of the input order
    assert a != fractions.select_cases(case_ids, labels, 0.2, seed=4, stratify=True)
    bigger = fractions.select_cases(case_ids, labels, 0.5, seed=3, stratify=True)
    assert set(a) < set(bigger)  # label-efficiency subsets are nested
    everything = fractions.select_cases(case_ids, labels, 1.0, seed=3, stratify=True)
    assert len(everything) == len(set(case_ids))


def test_unstratified_fraction_counts_cases_not_images():
    case_ids, _ = make_cases(num_cases=50)
    kept = fractions.select_cases(case_ids, None, 0.1, seed=0, stratify=False)
    assert len(kept) == 5


def test_case_label_is_the_majority_of_its_images():
    labels = fractions.case_labels(["a", "a", "a", "b", "c", "c"], [2, 1, 2, -1, 0, 1])
    assert labels == {"a": 2, "b": -1, "c": 0}


def test_fraction_that_empties_a_class_or_the_split_is_an_error():
    case_ids = [f"c{i}" for i in range(41)]
    labels = [0] * 40 + [1]  # class 1 has a single case
    with pytest.raises(ValueError, match="'pneumonia'"):
        fractions.select_cases(case_ids, labels, 0.1, 0, True, class_names=["normal", "pneumonia"])
    with pytest.raises(ValueError, match="empty"):
        fractions.select_cases(case_ids[:3], None, 0.1, 0, stratify=False)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="label_fraction"):
            fractions.select_cases(case_ids, labels, bad, 0, True)
    with pytest.raises(ValueError, match="aligned"):
        fractions.select_cases(case_ids, labels[:-1], 0.5, 0, True)


def test_cases_file_round_trip(tmp_path):
    kept = ["p1", "p2", "p10"]
    path = rundir.write_cases(str(tmp_path), kept)
    assert path.endswith(rundir.CASES_FILE)
    assert rundir.read_cases(str(tmp_path)) == kept
