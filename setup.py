"""Packaging for hvd-easgd.

Horovod is an sdist that compiles against the installed torch, so the supported way to install
is `bash launch/setup.sh` (builds and caches the Horovod wheel first). On a cluster with a working
torch + Horovod already installed, `pip install -e .[test]` is enough.
"""

from setuptools import find_packages, setup

setup(
    name="hvd-easgd",
    version="0.1.0",
    description="Elastic Averaging SGD (EASGD/EAMSGD) and its baselines on Horovod + PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["hvd_easgd", "hvd_easgd.*"]),
    # Horovod 0.28.1 imports distutils at build time: it does not build on Python 3.12+.
    python_requires=">=3.8,<3.12",
    install_requires=[
        "torch>=1.13",
        "torchvision>=0.14",
        "horovod>=0.28.1,<0.29",
        "numpy",
        "pyyaml>=5.4",
        "omegaconf>=2.3",
        "tensorboard>=2.10",
        "tqdm>=4.60",
        "scikit-learn>=1.0",
        "matplotlib>=3.5",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2.1",
                 # tests/test_layers.py: .importlinter's contracts (acyclic_siblings since 2.13)
                 "import-linter>=2.13,<3", "grimp>=3.5,<4"],
    },
    entry_points={
        "console_scripts": [
            "hvd-easgd-train=hvd_easgd.train.cli:main",
            "hvd-easgd-plot=hvd_easgd.train.plot:main",
            "hvd-easgd-sweep=hvd_easgd.train.sweep:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
