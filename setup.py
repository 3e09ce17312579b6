"""The package's metadata lives in pyproject.toml. This shim is for tools and workflows that
still call setup.py (`python setup.py sdist`, older pip); it adds nothing to it."""

from setuptools import setup

setup()
