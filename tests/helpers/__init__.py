"""Helpers shared by the tests: launching workers under torchrun, running pretrain_llama.py on a
small corpus, and a local Slurm cluster."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
