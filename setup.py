"""Only the optional C extension lives here; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds, and the predictor runs its numpy
featuriser and LightGBM's own prediction, which compute the same (each .c file says why C).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(f"sloproxy.predictor.{name}", sources=[f"sloproxy/predictor/{name}.c"], optional=True)
        for name in ("_ngrams", "_trees")
    ]
)
