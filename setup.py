"""Stratarank: a multi-objective ranking and real-time strategy engine.

Dependencies are pinned in requirements.lock and installed by the Makefile with
--no-deps (see the comment there); install_requires stays empty on purpose so that
`pip install -e .` never resolves the CUDA fbgemm package behind torchrec's metadata.
"""
from setuptools import setup

setup(
    name="stratarank",
    version="0.1.0",
    description="Multi-objective ranking and real-time strategy engine for mixed human/LLM feeds",
    python_requires=">=3.11",
    packages=["strategy", "world", "ranking", "online", "online.bus", "online.features", "experiments", "stratarank"],
    # the Redis store's Lua scripts (read with importlib.resources) and the dashboard's HTML templates
    package_data={"online.features": ["lua/*.lua"], "experiments": ["templates/*.j2", "templates/*.css"]},
    install_requires=[],
    entry_points={"console_scripts": ["stratarank=stratarank.cli:main"]},
)
