"""Experiment configs: ``python -m diffax.main --config=experiments/<name>.py --workdir=DIR`` (from the repo root)."""
