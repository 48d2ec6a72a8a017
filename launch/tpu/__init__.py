"""Cloud TPU launcher: one command for the life of a run on a TPU VM slice.

accelerators.py  slice types: hosts per slice, TPU VM software version
gcloud.py        every gcloud call, behind one runner interface (fakeable)
remote.py        the scripts run on the workers (install, start, follow, probe)
lifecycle.py     create -> install -> start -> follow -> resume -> delete
cli.py           flags and their checks; `python -m launch.tpu` (__main__.py)
"""
