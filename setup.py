"""Only the optional C extension lives here; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the predictor runs its
numpy featuriser, which computes the same features (sloproxy/predictor/_ngrams.c says why C).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sloproxy.predictor._ngrams",
            sources=["sloproxy/predictor/_ngrams.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
