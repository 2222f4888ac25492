"""var-jax: VAR (next-scale prediction) in JAX/Flax, for Cloud TPU pods and anywhere JAX runs."""
from setuptools import find_namespace_packages, setup

# The base install samples, edits, converts and loads models: no TensorFlow (flax brings optax
# and orbax-checkpoint, which the converted-model format uses).
INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "orbax-checkpoint>=0.12",
    "ml_collections>=1.1",
    "numpy>=1.26",
    "pillow>=10",
    "absl-py>=2",
    "huggingface_hub>=0.24",
    "tqdm>=4.66",
    # OpenBLAS (headers and library) for the float32 CPU matmuls built on first use
    # (var_jax/ops/cpu_gemm.py).
    "scipy-openblas32>=0.3.27",
]

TRAIN_REQUIRES = [
    "optax>=0.2.8",
    # The input pipeline (threads, worker processes, checkpointable iterator) and array_record.
    "grain>=0.2.12",
    "clu>=0.0.12",
    # clu's metric writers import tensorflow and tensorboard without declaring them.
    "tensorflow-cpu>=2.16",
    "tensorboard>=2.16",
]

EXTRAS_REQUIRE = {
    "train": TRAIN_REQUIRES,
    "tpu": ["jax[tpu]>=0.10"],
    "data": ["tensorflow-datasets>=4.9", "tensorflow-cpu>=2.16"],
    "test": TRAIN_REQUIRES + [
        "pytest>=8",
        # Two workers: most of the suite is single-threaded XLA compilation (CI has 2 cores).
        "pytest-xdist>=3.5",
        "tensorflow-datasets>=4.9",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
    ],
}

setup(
    name="var-jax",
    version="0.1.0",
    description="VAR (Visual AutoRegressive modeling) in JAX/Flax: tokenizer, transformer, sampler, pod-scale training.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # Namespace discovery lists the data-only folders (assets/...) as packages too, so setuptools
    # installs their files as package data without its "importable package" warning.
    packages=find_namespace_packages(include=["var_jax", "var_jax.*"]) + ["var_jax.configs"],
    # The repository's configs/ installs as var_jax.configs, so `--config var_tiny` works anywhere.
    package_dir={"var_jax.configs": "configs"},
    package_data={"var_jax": ["assets/*", "assets/**/*", "ops/*.cc"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["var-jax=var_jax.cli:main"]},
    license="MIT",
)
