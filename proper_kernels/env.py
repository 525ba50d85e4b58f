"""``python -m proper_kernels.env``: versions, devices and the usable backends."""
from __future__ import annotations

import importlib
import os
import platform
import sys


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report any import failure as "absent"
        return f"not importable ({type(exc).__name__})"
    return getattr(mod, "__version__", "unknown")


def report() -> dict:
    """Facts about this process: versions, devices, backends, the CUDA extension."""
    import torch

    import proper_kernels
    from proper_kernels.ops.mixture import available_backends

    info = {
        "proper_kernels": proper_kernels.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "backends_cpu": available_backends("cpu"),
        "backends_cuda": available_backends("cuda") if torch.cuda.is_available() else [],
    }
    try:
        from proper_kernels.ops import cuda_decode

        info["cuda_extension_built"] = cuda_decode.available()
        info["cuda_extension_archs"] = cuda_decode.built_archs()
        if not info["cuda_extension_built"]:
            info["cuda_extension_note"] = cuda_decode.unavailable_reason()
        dev = torch.device("cuda") if torch.cuda.is_available() else None
        try:
            max_T = cuda_decode.decode_threshold(dev, torch.bfloat16)
            info["cuda_decode_dispatch"] = (
                (f"T <= {max_T} (bf16), " if max_T else "off for auto (bf16, max_T = 0), ")
                + f"launch={cuda_decode.launch_mode(None, dev, torch.bfloat16)}, "
                + ("measured" if (cuda_decode._table_entry(dev, torch.bfloat16) or {}).get("measured")
                   else "not measured")
                + " (proper_kernels/ops/decode_table.json)")
        except ValueError as exc:  # a bad PROPER_KERNELS_CUDA_DECODE_* value
            info["cuda_decode_dispatch"] = f"error: {exc}"
    except ImportError as exc:
        info["cuda_extension_built"] = False
        info["cuda_extension_archs"] = []
        info["cuda_extension_note"] = str(exc)
    return info


def main() -> None:
    for key, value in report().items():
        print(f"{key:24s} {value}")


if __name__ == "__main__":
    main()
