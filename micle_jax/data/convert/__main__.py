"""`python -m micle_jax.data.convert`: the converter's command line (cli.py)."""

import os

# Before TensorFlow is imported: keep its C++ info logs out of the converter's report.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app

from micle_jax.data.convert import cli

if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main)
