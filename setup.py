"""paddlerec-milvus: MIND multi-interest recall (PaddlePaddle) with Milvus."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def requirements():
    with open(os.path.join(here, "requirements.txt"), encoding="utf-8") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


setup(
    name="paddlerec-milvus",
    version="0.1.0",
    description="Multi-interest candidate generation: MIND (PaddlePaddle) + Milvus",
    long_description=open(os.path.join(here, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["paddlerec_milvus", "paddlerec_milvus.*"]),
    install_requires=requirements(),
    entry_points={"console_scripts": ["paddlerec-milvus=paddlerec_milvus.cli:main"]},
    license="Apache-2.0",
)
