"""matrixopt: memory-efficient, matrix-aware optimizers for PyTorch.

`optim/` installs as `matrixopt` and `kernels/` as `matrixopt.kernels`: bare top-level
`optim` and `kernels` would collide with existing PyPI packages.
"""
from setuptools import setup

setup(
    name="matrixopt",
    version="0.1.0",
    description="Memory-efficient, matrix-aware optimizers (Muon, ROOT, ARO, GaLore, DCT) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["matrixopt", "matrixopt.kernels"],
    package_dir={"matrixopt": "optim", "matrixopt.kernels": "kernels"},
    package_data={"matrixopt": ["data/*.json"]},
    python_requires=">=3.10",
    # torch alone: CPU installs stay lean. Triton kernels run where triton is installed
    # (torch's CUDA wheels depend on it; or the `triton` extra); numpy and scipy only for the
    # offline Newton-Schulz coefficient fitter (`fit`).
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "fit": ["numpy", "scipy"],
        # expecttest: torch.testing._internal (torch's own optimizer error inputs) imports it.
        "test": ["pytest", "pytest-timeout", "hypothesis", "scikit-learn", "numpy", "scipy", "expecttest",
                 "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # Peers the ns benchmark compares with (both install without touching torch);
        # gram-newton-schulz pins CUDA-only kernels packages, so the Makefile adds it --no-deps.
        # The training codebases the recipes are tested in (tests/test_frameworks.py): plain
        # litgpt, not its data extras (they pull a CUDA torch); install with the pinned torch
        # as a constraint (the Makefile does) so none of them replaces it. torchtitan is
        # installed --no-deps by the Makefile (its data and metrics dependencies are not needed
        # here); tyro is the one of them its optimizer container needs to import.
        "frameworks": ["transformers", "accelerate", "lightning", "litgpt>=0.5,<0.6", "ai2-olmo-core==3.0.0",
                       "tyro"],
        "bench": ["tqdm", "matplotlib", "numpy", "scipy", "pytorch-optimizer==4.1.0", "heavyball==3.2.1"],
    },
)
