"""Builds the small demo datasets shipped in data/demo (see data/demo/README.md).

  python -m micle_jax.data.make_demo_data --shared=../shared/data --out=data/demo

- hannover_cxr: all 243 chest X-rays of the 71 patients of the Hannover
  COVID-19 image repository, longer side 64 px, unlabelled, every case in
  'train': the multi-image cases MICLe pre-trains on.
- pneumoniamnist: the class-balanced PneumoniaMNIST subset, 28 x 28, its own
  train / validation / test splits, classes normal / pneumonia: the labelled
  fine-tuning task.
- cxr_pool: the unlabelled pre-training pool of the demo: every Hannover case
  (64 px) plus the PneumoniaMNIST TRAINING images as one-image cases, labels
  dropped; its validation and test images never enter pre-training.
The output is deterministic: running it again gives identical files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from absl import app, flags

from micle_jax.data import convert, convert_images, convert_inputs

HANNOVER = "hannover-covid-cxr"
PNEUMONIAMNIST = "pneumoniamnist-balanced/pneumoniamnist.npz"

flags.DEFINE_string("shared", "../shared/data", "folder holding the two source datasets")
flags.DEFINE_string("out", "data/demo", "destination folder of the demo datasets")
flags.DEFINE_integer("size", 64, "longer side of the Hannover images after downscaling")


HANNOVER_SOURCE = (
    "COVID-19 image repository, Institute for Diagnostic and Interventional Radiology, "
    "Hannover Medical School (GitHub ml-workgroup/covid-19-image-repository, commit ad7ab09)"
)
PNEUMONIA_SOURCE = (
    "PneumoniaMNIST (MedMNIST v2), class-balanced subset from GitHub aksufatih/snn-medmnist "
    "(pneumoniamnist.npz); NOT the official MedMNIST release"
)


def hannover_plan(shared: str) -> convert_inputs.Plan:
    """Every Hannover image, grouped by patient, all in 'train'."""
    root = os.path.join(shared, HANNOVER)
    return convert_inputs.cases_from_csv(
        os.path.join(root, "data.csv"),
        case_column="patient_id",
        image_root=root,
        image_path_template="png/{image_id}.png",
        image_id_column="image_id",
        meta_columns=("projection", "modality", "sex"),
        split_fractions="train=1",
    )


def make_hannover(shared: str, out: str, size: int) -> None:
    """Converts every Hannover image, downscaled to `size`, into out/hannover_cxr."""
    root = os.path.join(shared, HANNOVER)
    plan = hannover_plan(shared)
    destination = os.path.join(out, "hannover_cxr")
    convert.convert(
        plan,
        destination,
        num_shards=2,  # lets a two-process demo give each process its own shard
        options=convert_images.ImageOptions(resize_longer_side=size),
        overwrite=True,
        name="hannover_cxr",
        source=f"{HANNOVER_SOURCE}, downscaled to longer side {size} px",
        license="CC BY 3.0 (see LICENSE)",
        citation="Hannover Medical School COVID-19 image repository, DOI 10.25835/0090041",
    )
    # CC BY 3.0 requires the licence to travel with every copy.
    shutil.copyfile(os.path.join(root, "LICENSE"), os.path.join(destination, "LICENSE"))


def make_pneumoniamnist(shared: str, out: str) -> None:
    """Converts the balanced PneumoniaMNIST npz into out/pneumoniamnist."""
    plan = convert_inputs.cases_from_npz(
        os.path.join(shared, PNEUMONIAMNIST), class_names=("normal", "pneumonia")
    )
    convert.convert(
        plan,
        os.path.join(out, "pneumoniamnist"),
        num_shards={"train": 2, "validation": 1, "test": 1},
        overwrite=True,
        name="pneumoniamnist_balanced",
        source=PNEUMONIA_SOURCE,
        license="CC BY 4.0",
        citation="Yang et al., MedMNIST v2, Scientific Data 2023; Kermany et al., Cell 2018",
    )


def make_pool(shared: str, out: str, size: int) -> None:
    """Hannover cases + PneumoniaMNIST training images, unlabelled, into out/cxr_pool."""
    pneumonia = convert_inputs.cases_from_npz(os.path.join(shared, PNEUMONIAMNIST))
    cases = hannover_plan(shared).cases
    for case in pneumonia.cases:
        if case.split != "train":
            continue  # evaluation images never enter pre-training
        for image in case.images:
            image.label_class = -1
        cases.append(dataclasses.replace(case, case_id=f"pneumoniamnist-{case.case_id}"))
    plan = convert_inputs.Plan(
        cases=cases,
        label_type="none",
        class_names=[],
        problems=[],
        args={"pool": ["hannover_cxr", "pneumoniamnist train (labels dropped)"]},
    )
    destination = os.path.join(out, "cxr_pool")
    convert.convert(
        plan,
        destination,
        num_shards=2,
        options=convert_images.ImageOptions(resize_longer_side=size),
        overwrite=True,
        name="cxr_pool",
        source=f"{HANNOVER_SOURCE} (longer side {size} px) + {PNEUMONIA_SOURCE} (train split)",
        license="Hannover images: CC BY 3.0 (see LICENSE); PneumoniaMNIST images: CC BY 4.0",
        citation="DOI 10.25835/0090041; Yang et al., Scientific Data 2023; Kermany et al., "
        "Cell 2018",
    )
    shutil.copyfile(os.path.join(shared, HANNOVER, "LICENSE"), os.path.join(destination, "LICENSE"))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    shared = flags.FLAGS.shared
    for needed in (os.path.join(shared, HANNOVER, "LICENSE"), os.path.join(shared, PNEUMONIAMNIST)):
        if not os.path.isfile(needed):
            raise app.UsageError(f"{needed} not found; point --shared at the shared data folder")
    make_hannover(shared, flags.FLAGS.out, flags.FLAGS.size)
    make_pneumoniamnist(shared, flags.FLAGS.out)
    make_pool(shared, flags.FLAGS.out, flags.FLAGS.size)


if __name__ == "__main__":
    app.run(main)
