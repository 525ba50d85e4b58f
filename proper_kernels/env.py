"""``python -m proper_kernels.env``: versions, devices, and which path a call takes here.

For each device of this machine it shows the path ``proper_kernels.lora_mixture``
takes, with its reason (``proper_kernels.explain``), for a training call and an
inference call of a small PROPER layer; on a CUDA machine also the CUDA decode
kernel's dispatch entry. Versions are read from package metadata, so nothing heavy
(transformers, peft) is imported.
"""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _paths(device) -> dict:
    """The dispatch decision for a training and an inference call on ``device``."""
    import torch

    import proper_kernels as pk

    out = {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    T, d, K, r, N = 16, 64, 4, 8, 4
    x = torch.zeros(T, d, device=device, dtype=dtype)
    W = torch.zeros(d, d, device=device, dtype=dtype)
    kw = dict(expert_A=torch.zeros(K, r, d, device=device, dtype=dtype),
              expert_B=torch.zeros(K, d, r, device=device, dtype=dtype),
              user_A=torch.zeros(N, r, d, device=device, dtype=dtype),
              user_B=torch.zeros(N, d, r, device=device, dtype=dtype),
              user_ids=torch.zeros(T, dtype=torch.long, device=device))
    str_dtype = str(dtype).replace("torch.", "")
    for what, grad in (("training", True), ("inference", False)):
        args = {k: (v.requires_grad_(grad) if v.is_floating_point() else v) for k, v in kw.items()}
        with torch.set_grad_enabled(grad):
            try:
                path = pk.explain(x, W, **args)
                out[f"path {device.type} {what} ({str_dtype}, T={T})"] = f"{path.backend}: {path.reason}"
            except (RuntimeError, ValueError) as exc:
                out[f"path {device.type} {what}"] = f"error: {exc}"
    return out


def report() -> dict:
    """Facts about this process: versions, devices, backends, paths, the CUDA extension."""
    import torch

    import proper_kernels
    from proper_kernels.ops import cuda_decode
    from proper_kernels.ops.dispatch import available_backends

    has_cuda = torch.cuda.is_available()
    info = {
        "proper_kernels": proper_kernels.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "CPU only",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "PROPER_KERNELS_BACKEND": os.environ.get("PROPER_KERNELS_BACKEND", "(unset: auto)"),
        "backends cpu": available_backends("cpu"),
    }
    if has_cuda:
        info["backends cuda"] = available_backends("cuda")
    from proper_kernels.ops import torch_backend

    info["cpu kernels"] = ("built (proper_kernels._cpu: the torch backend's wide variant)" if torch_backend._cpu_kernels()
                           else "not built (pip install --no-build-isolation -e . with a C++ compiler): "
                                "the wide variant runs as torch ops")
    info["cuda extension"] = (f"built for {', '.join(cuda_decode.built_archs())}" if cuda_decode.available()
                              else cuda_decode.unavailable_reason())
    overridden = any(os.environ.get(v) for v in ("PROPER_KERNELS_CUDA_DECODE_MAX_T", "PROPER_KERNELS_CUDA_DECODE_LAUNCH"))
    if has_cuda or overridden:
        dev = torch.device("cuda") if has_cuda else None
        try:
            max_T = cuda_decode.decode_threshold(dev, torch.bfloat16)
            entry = cuda_decode._table_entry(dev, torch.bfloat16) or {}
            info["cuda decode dispatch"] = (
                (f"T <= {max_T} (bf16), " if max_T else "off for auto (bf16, max_T = 0), ")
                + f"launch={cuda_decode.launch_mode(None, dev, torch.bfloat16)}, "
                + ("measured" if entry.get("measured") else "not measured")
                + " (proper_kernels/ops/decode_table.json)")
        except ValueError as exc:  # a bad PROPER_KERNELS_CUDA_DECODE_* value
            info["cuda decode dispatch"] = f"error: {exc}"
    for device in [torch.device("cpu")] + ([torch.device("cuda")] if has_cuda else []):
        info.update(_paths(device))
    return info


def main() -> None:
    for key, value in report().items():
        print(f"{key:40s} {value}")


if __name__ == "__main__":
    main()
