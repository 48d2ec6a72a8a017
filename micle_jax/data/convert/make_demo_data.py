"""Builds the small demo datasets shipped in data/demo (see data/demo/README.md).

  python -m micle_jax.data.convert.make_demo_data --shared=../shared/data --out=data/demo
  python -m micle_jax.data.convert.make_demo_data --only=ham10000,kermany_cxr   # just these

- hannover_cxr: all 243 chest X-rays of the 71 patients of the Hannover
  COVID-19 image repository, longer side 64 px, unlabelled, every case in
  'train': the multi-image cases MICLe pre-trains on.
- pneumoniamnist: the class-balanced PneumoniaMNIST subset, 28 x 28, its own
  train / validation / test splits, classes normal / pneumonia: the labelled
  fine-tuning task.
- cxr_pool: the unlabelled pre-training pool of the demo: every Hannover case
  (64 px) plus the PneumoniaMNIST TRAINING images as one-image cases, labels
  dropped; its validation and test images never enter pre-training.
- ham10000: all 10,015 HAM10000 dermatoscopic images of 7,470 lesions, 64 x 48
  RGB JPEG, 7 diagnosis classes, split by lesion 0.7 / 0.15 / 0.15
  (NON-COMMERCIAL licence).
- kermany_cxr: all 5,216 pediatric chest X-rays of the Kermany et al. TRAINING
  split, 2,846 patients, 64 x 64 grayscale JPEG, normal / pneumonia, split by
  patient 0.7 / 0.15 / 0.15.
The output is deterministic: running it again gives identical files.
"""

from __future__ import annotations

import os

# Before TensorFlow is imported: keep its C++ info logs out of the converter's report.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import dataclasses
import shutil
import textwrap

from absl import app, flags

from micle_jax.data.convert import images, inputs, write

HANNOVER = "hannover-covid-cxr"
PNEUMONIAMNIST = "pneumoniamnist-balanced/pneumoniamnist.npz"
HAM10000 = "ham10000"
KERMANY = "kermany-pediatric-cxr"
SPLITS_BY_CASE = "train=0.7,validation=0.15,test=0.15"
# 64 px and JPEG quality 90 keep HAM10000 and Kermany together at 25 MB; PNG
# would make HAM10000 3.5 times and the X-rays 1.6 times larger.
SMALL_JPEG = dict(resize_longer_side=64, image_format="jpeg", jpeg_quality=90)


HANNOVER_SOURCE = (
    "COVID-19 image repository, Institute for Diagnostic and Interventional Radiology, "
    "Hannover Medical School (GitHub ml-workgroup/covid-19-image-repository, commit ad7ab09)"
)
PNEUMONIA_SOURCE = (
    "PneumoniaMNIST (MedMNIST v2), class-balanced subset from GitHub aksufatih/snn-medmnist "
    "(pneumoniamnist.npz); NOT the official MedMNIST release"
)
HAM10000_SOURCE = (
    "HAM10000 (Harvard Dataverse doi:10.7910/DVN/DBW86T), the 200x150 JPEG copy of GitHub "
    "mmalek06/bounding-box-detection-ham1000 (commit fcf5ea8), downscaled to 64x48 px, "
    "JPEG quality 90"
)
HAM10000_CITATION = (
    "Tschandl P., Rosendahl C., Kittler H., The HAM10000 dataset, a large collection of "
    "multi-source dermatoscopic images of common pigmented skin lesions, Sci. Data 5:180161 "
    "(2018), doi:10.1038/sdata.2018.161"
)
KERMANY_SOURCE = (
    "Pediatric chest X-rays of Kermany et al. (Mendeley Data doi:10.17632/rscbjbr9sj), "
    "original TRAINING split only, the 224x224 copy of GitHub waliatushar/ai-pneumonia-detection "
    "(commit 362d6d1), downscaled to 64x64 px, grayscale, JPEG quality 90"
)
KERMANY_CITATION = (
    "Kermany D. S. et al., Identifying Medical Diagnoses and Treatable Diseases by Image-Based "
    "Deep Learning, Cell 172(5):1122-1131 (2018); data: Mendeley Data doi:10.17632/rscbjbr9sj"
)

# Neither source folder holds a licence file: these travel with the copies.
HAM10000_LICENSE = f"""\
HAM10000, downscaled copy (data/demo/ham10000)

NON-COMMERCIAL USE ONLY. These images are licensed under the Creative Commons
Attribution-NonCommercial 4.0 International licence (CC BY-NC 4.0):
https://creativecommons.org/licenses/by-nc/4.0/
(legal code: https://creativecommons.org/licenses/by-nc/4.0/legalcode).
Use them for non-commercial research only. This licence covers these images
only, not the micle_jax code they are shipped with.

{textwrap.fill(f"Attribution: {HAM10000_CITATION}.", 79)}
The dataset is published on Harvard Dataverse, doi:10.7910/DVN/DBW86T.

Changes made: the images were taken from the 200 x 150 JPEG copy of the dataset
in GitHub repository mmalek06/bounding-box-detection-ham1000 (commit fcf5ea8),
downscaled to 64 x 48 pixels (bicubic, antialiased), re-encoded as JPEG
(quality 90) and grouped by lesion_id into the case records of micle_jax
(docs/data_format.md), with the dataset's own metadata (dx as the label; dx_type,
age, sex, localization). All 10,015 images are included.

The images are provided as they are, without warranties of any kind.
"""
KERMANY_LICENSE = f"""\
Pediatric chest X-rays of Kermany et al., downscaled copy (data/demo/kermany_cxr)

These images are licensed under the Creative Commons Attribution 4.0
International licence (CC BY 4.0):
https://creativecommons.org/licenses/by/4.0/
(legal code: https://creativecommons.org/licenses/by/4.0/legalcode).

{textwrap.fill(f"Attribution: {KERMANY_CITATION}.", 79)}

Changes made: only the original TRAINING split (5,216 images) is included, as
resized (stretched) to 224 x 224 pixels by GitHub repository
waliatushar/ai-pneumonia-detection (commit 362d6d1); the images were converted
to 8-bit grayscale, downscaled to 64 x 64 pixels (bicubic, antialiased),
re-encoded as JPEG (quality 90) and grouped by the patient id of their file
names into the case records of micle_jax (docs/data_format.md); the labels
NORMAL / PNEUMONIA are stored as the classes normal / pneumonia.

The images are provided as they are, without warranties of any kind.
"""


def hannover_plan(shared: str) -> inputs.Plan:
    """Every Hannover image, grouped by patient, all in 'train'."""
    root = os.path.join(shared, HANNOVER)
    return inputs.cases_from_csv(
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
    write.convert(
        plan,
        destination,
        num_shards=2,  # lets a two-process demo give each process its own shard
        options=images.ImageOptions(resize_longer_side=size),
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
    plan = inputs.cases_from_npz(
        os.path.join(shared, PNEUMONIAMNIST), class_names=("normal", "pneumonia")
    )
    write.convert(
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
    pneumonia = inputs.cases_from_npz(os.path.join(shared, PNEUMONIAMNIST))
    cases = hannover_plan(shared).cases
    for case in pneumonia.cases:
        if case.split != "train":
            continue  # evaluation images never enter pre-training
        for image in case.images:
            image.label_class = -1
        cases.append(dataclasses.replace(case, case_id=f"pneumoniamnist-{case.case_id}"))
    plan = inputs.Plan(
        cases=cases,
        label_type="none",
        class_names=[],
        problems=[],
        args={"pool": ["hannover_cxr", "pneumoniamnist train (labels dropped)"]},
    )
    destination = os.path.join(out, "cxr_pool")
    write.convert(
        plan,
        destination,
        num_shards=2,
        options=images.ImageOptions(resize_longer_side=size),
        overwrite=True,
        name="cxr_pool",
        source=f"{HANNOVER_SOURCE} (longer side {size} px) + {PNEUMONIA_SOURCE} (train split)",
        license="Hannover images: CC BY 3.0 (see LICENSE); PneumoniaMNIST images: CC BY 4.0",
        citation="DOI 10.25835/0090041; Yang et al., Scientific Data 2023; Kermany et al., "
        "Cell 2018",
    )
    shutil.copyfile(os.path.join(shared, HANNOVER, "LICENSE"), os.path.join(destination, "LICENSE"))


def _write_license(destination: str, text: str) -> None:
    with open(os.path.join(destination, "LICENSE"), "w", encoding="utf-8") as f:
        f.write(text)


def make_ham10000(shared: str, out: str) -> None:
    """Every HAM10000 image, 64 x 48 JPEG, grouped by lesion, into out/ham10000."""
    root = os.path.join(shared, HAM10000)
    plan = inputs.cases_from_csv(
        os.path.join(root, "metadata.csv"),
        case_column="lesion_id",
        image_root=root,
        image_path_template="images/{image_id}.jpg",
        image_id_column="image_id",
        label_column="dx",  # classes: the sorted dx values, akiec .. vasc
        meta_columns=("dx_type", "age", "sex", "localization"),
        split_fractions=SPLITS_BY_CASE,
    )
    destination = os.path.join(out, "ham10000")
    write.convert(
        plan,
        destination,
        num_shards={"train": 4, "validation": 1, "test": 1},
        options=images.ImageOptions(**SMALL_JPEG),
        overwrite=True,
        name="ham10000",
        source=HAM10000_SOURCE,
        license="CC BY-NC 4.0, NON-COMMERCIAL research use only (see LICENSE)",
        citation=f"{HAM10000_CITATION}; Harvard Dataverse doi:10.7910/DVN/DBW86T",
    )
    _write_license(destination, HAM10000_LICENSE)


def make_kermany(shared: str, out: str) -> None:
    """Every Kermany training X-ray, 64 x 64 grayscale JPEG, by patient, into out/kermany_cxr."""
    root = os.path.join(shared, KERMANY)
    plan = inputs.cases_from_csv(
        os.path.join(root, "metadata.csv"),
        case_column="patient_id",
        image_root=root,
        image_column="image",  # also the image id: train/NORMAL/IM-0115-0001.jpeg
        label_column="label",
        split_fractions=SPLITS_BY_CASE,
    )
    # The converter takes class names from the label values (or indices into
    # --class_names); it cannot rename them. Lower-casing keeps their sorted order,
    # so every image's class index stays right.
    names = [name.lower() for name in plan.class_names]
    if names != ["normal", "pneumonia"]:
        raise ValueError(f"{KERMANY}: labels {plan.class_names}, expected NORMAL, PNEUMONIA")
    plan.args.update(class_names=names, label_values=plan.class_names)
    plan.class_names = names
    destination = os.path.join(out, "kermany_cxr")
    write.convert(
        plan,
        destination,
        num_shards={"train": 2, "validation": 1, "test": 1},
        options=images.ImageOptions(grayscale=True, **SMALL_JPEG),
        overwrite=True,
        name="kermany_cxr",
        source=KERMANY_SOURCE,
        license="CC BY 4.0 (see LICENSE)",
        citation=KERMANY_CITATION,
    )
    _write_license(destination, KERMANY_LICENSE)


# Every dataset this script builds, with the source files it needs under --shared.
DATASETS = {
    "hannover_cxr": (f"{HANNOVER}/LICENSE",),
    "pneumoniamnist": (PNEUMONIAMNIST,),
    "cxr_pool": (f"{HANNOVER}/LICENSE", PNEUMONIAMNIST),
    "ham10000": (f"{HAM10000}/metadata.csv",),
    "kermany_cxr": (f"{KERMANY}/metadata.csv",),
}


def _define_flags() -> None:
    # Defined only when run as a program, so tests can import this module.
    flags.DEFINE_string("shared", "../shared/data", "folder holding the source datasets")
    flags.DEFINE_string("out", "data/demo", "destination folder of the demo datasets")
    flags.DEFINE_integer("size", 64, "longer side of the Hannover images after downscaling")
    flags.DEFINE_list("only", [], f"build only these datasets (default: all): {list(DATASETS)}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    names = f.only or list(DATASETS)
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        raise app.UsageError(f"--only: unknown datasets {unknown}; choose from {list(DATASETS)}")
    for name in names:
        for needed in DATASETS[name]:
            if not os.path.isfile(os.path.join(f.shared, needed)):
                raise app.UsageError(
                    f"{os.path.join(f.shared, needed)} not found; point --shared at the shared "
                    "data folder"
                )
    build = {
        "hannover_cxr": lambda: make_hannover(f.shared, f.out, f.size),
        "pneumoniamnist": lambda: make_pneumoniamnist(f.shared, f.out),
        "cxr_pool": lambda: make_pool(f.shared, f.out, f.size),
        "ham10000": lambda: make_ham10000(f.shared, f.out),
        "kermany_cxr": lambda: make_kermany(f.shared, f.out),
    }
    for name in names:
        build[name]()


if __name__ == "__main__":
    _define_flags()
    app.run(main)
