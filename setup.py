"""Build script. All metadata lives in pyproject.toml.

The native CPU extension (csrc/) is not built yet; when it is, it will be added here as an optional
extension that is skipped, with a clear message, when no compiler is available.
"""
from setuptools import setup

setup()
