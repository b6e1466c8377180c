"""Stratarank's metadata is in pyproject.toml (PEP 621); this file lets older tools build it too."""
from setuptools import setup

setup()
