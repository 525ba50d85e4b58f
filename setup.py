"""Install proper-kernels.

`pip install -e .` works with or without CUDA: the pure-PyTorch reference always
runs, the Triton kernels run where triton is installed (any CUDA machine, or the CPU
interpreter with TRITON_INTERPRET=1), and the CUDA decode extension in csrc/ is built
only where nvcc is found (see python/build_cuda.py). The CPU kernels in csrc/cpu/ are
built with the host C++ compiler against the installed torch (python/build_cpu.py);
without them the same math runs in plain PyTorch ops.
"""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "python"))

cmdclass = {}
ext_modules = []
try:
    import build_cuda  # python/build_cuda.py: never installed, only used here

    ext_modules, cmdclass = build_cuda.cuda_extensions(HERE)
except ImportError:  # the helper is absent: pure-Python install
    pass
try:
    import build_cpu  # python/build_cpu.py: the CPU kernels, never installed

    cpu_ext = build_cpu.cpu_extension(HERE)
    if cpu_ext is not None:
        ext_modules.append(cpu_ext)
        # The CUDA helper's build_ext already drops a failing extension; else this one does.
        cmdclass.setdefault("build_ext", build_cpu.tolerant_build_ext())
except ImportError:
    pass

setup(
    name="proper-kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for PROPER-style personalised LoRA mixtures",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["proper_kernels", "proper_kernels.*"]),
    package_data={"proper_kernels.ops": ["decode_table.json"]},
    python_requires=">=3.9",
    # torch>=2.4 admits the torch the user already has (the CPU 2.13.0 file on our
    # machines, any CUDA build elsewhere); triton only where it ships wheels.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "safetensors",
    ],
    extras_require={
        "hf": ["transformers>=4.40", "peft>=0.11"],
        # scikit-learn and rouge-score: the LaMP metrics of `python -m proper_kernels.train`.
        "train": ["transformers>=4.40", "tqdm", "scikit-learn", "rouge-score"],
        "test": ["pytest", "pytest-xdist", "transformers>=4.40", "peft>=0.11", "pybind11", "tqdm", "scikit-learn", "rouge-score",
                 "matplotlib"],
        "bench": ["tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
