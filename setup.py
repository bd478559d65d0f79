"""tfrs-ctx: a contextual sequential two-tower ad candidate generator."""

import pathlib

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent

# Direct dependencies, pinned to the series known to install together; requirements.txt
# holds the exact versions CI installs (the full resolved set).
INSTALL_REQUIRES = [
    "tensorflow==2.21.*",
    "tf-keras==2.21.*",
    "tensorflow-recommenders==0.7.7",
    "tensorflow-serving-api==2.21.*",
    "apache-beam==2.77.*",
    "feast[redis]==0.67.*",
    "google-crc32c==1.9.*",
    "grpcio==1.85.*",
    "numpy==2.4.*",
    "pandas==2.3.*",
    "pyarrow==25.0.*",
    "pyyaml==6.0.*",
    "matplotlib==3.11.*",
    "tensorboard==2.21.*",
    "tqdm==4.70.*",
    "psutil==7.2.*",
]
TEST_REQUIRES = ["pytest==9.2.*", "pytest-timeout==2.4.*", "ruff==0.17.*", "redis==7.4.*"]

setup(
    name="tfrs-ctx",
    version="0.1.0",
    description=__doc__,
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(
        include=["tfrs_ctx", "tfrs_ctx.*", "beam_pipelines", "beam_pipelines.*", "serving", "serving.*"]
    ),
    package_data={"tfrs_ctx": ["configs/*.yaml"], "serving": ["*.config", "*.txt"]},
    data_files=[
        ("share/tfrs-ctx/feature_repo", [str(p) for p in sorted((ROOT / "feature_repo").glob("*")) if p.is_file()])
    ],
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["tfrs-ctx = tfrs_ctx.apps.cli:main"]},
)
