"""Launchers: parameter sweeps (local, printed, XManager) over micle_jax.main runs."""
