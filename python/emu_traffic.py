#!/usr/bin/env python
"""Memory traffic of the CUDA decode kernel, counted in the CPU emulation (no GPU).

The emulation build of csrc/ (``python python/build_cuda.py --emulate``) counts, per
launch, the bytes of the kernel's global vector loads: weights (expert A/B, router,
the users' A/B) and activations (x), each as *requested* (every load) and *unique*
(each address once). Unique weight bytes are what HBM must deliver at least once;
requested / unique is the re-read factor the caches absorb (a shared expert row is
read once per 8-token tile; a user's rows once per token of that user). It says
nothing about time: that needs a GPU (benchmarks/run.py).

    python python/emu_traffic.py                         # square-4096 shapes, T in 1 16 64 256
    python python/emu_traffic.py --T 1 64 --d-in 4096 --d-out 11008 --users zipf

Shapes default to the benchmark's square-4096 preset (d = 4096, K = 8, r = 16,
r_u = 16, N = 64 users, bf16). Emulating d = 4096 at T = 256 takes a few seconds.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import build_cuda  # noqa: E402
from proper_kernels.ops import cuda_decode  # noqa: E402
from proper_kernels.reference import ADAPTER_TENSORS, Adapters  # noqa: E402
from proper_kernels.testing import POPULARITY_LAWS, make_mixture_inputs  # noqa: E402


def measure(emu, T: int, d_in: int, d_out: int, K: int, r: int, r_u: int, N: int, law: str,
            launch: str, sms: int, dtype=torch.bfloat16) -> dict:
    """One emulated call; returns its summed traffic and the weights' model bytes."""
    inp = make_mixture_inputs(T, d_in, d_out, K=K, r=r, r_u=r_u, N=N, law=law, dtype=dtype)
    ids = inp["user_ids"]
    emu.configure(sms=sms)
    emu.launches(clear=True)
    adapters = Adapters.from_flat([inp[name] for name in ADAPTER_TENSORS])  # traffic does not depend on the scales
    with torch.no_grad():
        cuda_decode.run_extension(emu, inp["x"], None, None, adapters, user_ids=ids, launch=launch)
    log = emu.launches(clear=True)
    e = torch.finfo(dtype).bits // 8
    users = int((ids.unique() >= 0).sum())
    model = e * (K * r * d_in + K * d_in + users * r_u * d_in + K * d_out * r + users * d_out * r_u)
    out = {k: sum(entry[k] for entry in log) for k in ("weight_bytes", "weight_bytes_unique", "act_bytes",
                                                         "act_bytes_unique")}
    out.update(model=model, users=users, launches=" + ".join(f"{x['kernel']}{list(x['grid'])}" for x in log))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--d-in", type=int, default=4096)
    ap.add_argument("--d-out", type=int, default=4096)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--r-u", type=int, default=16)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--users", choices=POPULARITY_LAWS, default="distinct",
                    help="popularity law of the token ids (proper_kernels.testing): distinct, uniform, zipf, "
                    "identical (one user owns the batch), skewed")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the emulated GPU (132: H100 SXM)")
    args = ap.parse_args(argv)
    emu = build_cuda.load_emulator(ROOT)
    print(f"decode kernel traffic (CPU emulation; bf16; d_in={args.d_in} d_out={args.d_out} K={args.K} r={args.r} "
          f"r_u={args.r_u} N={args.N}, users {args.users}, {args.sms} SMs)")
    print(f"{'T':>5} {'launch':>6} {'users':>5} {'weights MB':>10} {'model MB':>9} {'requested MB':>12} "
          f"{'re-read':>7} {'x re-read':>9}  launches")
    for T in args.T:
        for launch in ("two", "one"):
            m = measure(emu, T, args.d_in, args.d_out, args.K, args.r, args.r_u, args.N, args.users,
                        launch, args.sms)
            print(f"{T:>5} {launch:>6} {m['users']:>5} {m['weight_bytes_unique'] / 1e6:>10.3f} {m['model'] / 1e6:>9.3f} "
                  f"{m['weight_bytes'] / 1e6:>12.3f} {m['weight_bytes'] / max(1, m['weight_bytes_unique']):>7.2f} "
                  f"{m['act_bytes'] / max(1, m['act_bytes_unique']):>9.2f}  {m['launches']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
