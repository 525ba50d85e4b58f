"""What the tests and the benchmark share (nothing here is imported by the package).

* :mod:`.inputs`     user-popularity laws, random inputs of one adapted linear, the
                     (fp64, fp32) reference pair of a case
* :mod:`.tolerance`  the one tolerance rule of every comparison with the oracle
* :mod:`.hf`         tiny Hugging Face models, adapters and data (transformers and peft
                     imported inside the functions)
* :mod:`.cuda`       the CUDA decode tests' build helpers, emulator, oracles and call helper

Everything is importable from ``proper_kernels.testing`` itself.
"""
from .cuda import *  # noqa: F401,F403
from .cuda import __all__ as _cuda
from .hf import *  # noqa: F401,F403
from .hf import __all__ as _hf
from .inputs import *  # noqa: F401,F403
from .inputs import __all__ as _inputs
from .tolerance import *  # noqa: F401,F403
from .tolerance import __all__ as _tolerance

__all__ = _inputs + _tolerance + _hf + _cuda
