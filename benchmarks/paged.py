#!/usr/bin/env python
"""The paged user bank at scale: tokens/s of a training step and of generation with
N users in host memory and C device slots, against the all-resident bank.

    python benchmarks/paged.py                                   # N = 64, 1k, 10k, 100k; C = 256
    python benchmarks/paged.py --users 64,1000 --cache-size 128 --steps 8
    python benchmarks/run.py --preset paged                      # the same rows in run.py's files

Per N: a Llama whose q_proj and v_proj carry per-user LoRAs of rank 8 (no experts:
the user part alone), every batch ``--active`` users (one row each) drawn without
replacement by Zipf popularity (rank k of a random permutation of the N users with
p ~ k^-1.5), a new batch each step. Rows:

* ``paged`` train-step / generate: ``ProperConfig(user_bank="paged", user_cache_size=C)``
  (C = min(``--cache-size``, N)), the optimiser of ``pm.make_optimizer``;
* ``resident``: the same batches with every user's rows on the device, where they fit
  (rows, gradients and AdamW state of all N users under ``--resident-limit-gb``).

Each reports tokens/s (tokens of a step over the median step time, after warm-up
steps that fill the cache), the median step, the cache hit rate and bytes moved per batch (host to device
and back), and the bytes of the user part on the device and in host memory. CPU: a
tiny Llama (hidden 64, 2 layers; 16 KB a user in fp32). GPU: Llama-7B-like dims
(hidden 4096, 32 layers) in bf16, 8.4 MB a user; ``--mmap DIR`` keeps the host bank
as a copy-on-write map of a sparse safetensors file in DIR (zero rows, no disk
written until a row changes), for N beyond host memory.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

USER_COUNTS = (64, 1000, 10000, 100000)
TARGETS = ("q_proj", "v_proj")
MODES = ("train-step", "generate")


def llama_dims(gpu: bool) -> Dict[str, int]:
    """Llama-7B-like dims on GPU, the e2e benchmark's tiny Llama on CPU."""
    if gpu:
        return dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
    from e2e import tiny_llama_config

    return tiny_llama_config(False)


def base_model(device: torch.device, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**llama_dims(device.type == "cuda"))
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def proper_config(N: int, r_u: int, bank: str, cache: int):
    from proper_kernels.integrations import ProperConfig

    return ProperConfig(target_modules=TARGETS, num_experts=0, population_rank=0, num_users=N, user_rank=r_u,
                        user_alpha=2.0 * r_u, user_embed_dim=0, user_router=False, user_bank=bank,
                        user_cache_size=cache if bank == "paged" else 0)


def bytes_per_user(base, r_u: int) -> int:
    """Bytes of one user's rows: A_u [r_u, d_in] and B_u [d_out, r_u] of every targeted linear."""
    return sum(r_u * (m.in_features + m.out_features) * m.weight.element_size() for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)


def zipf_batches(N: int, active: int, n: int, seed: int = 0) -> List[torch.Tensor]:
    """``n`` batches of min(active, N) distinct users: rank k (of a random permutation)
    drawn with p ~ k^-1.5, without replacement within a batch."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    p = torch.arange(1, N + 1, dtype=torch.float64).pow(-1.5)
    k = min(active, N)
    return [perm[torch.multinomial(p, k, replacement=False, generator=g)] for _ in range(n)]


def sparse_bank_dir(directory: str, base, cfg, device) -> str:
    """A ProperModel directory whose N users' rows are a hole of a sparse safetensors
    file (zeros): the shared tensors and config of a one-user model, the bank grown to
    ``cfg.num_users`` rows without writing them."""
    import json

    from proper_kernels.integrations import get_proper_model
    from proper_kernels.integrations.bank_io import write_safetensors
    from proper_kernels.integrations.persistence import CONFIG_NAME, WEIGHTS_NAME

    one = copy.deepcopy(cfg)
    one.num_users = 1
    pm = get_proper_model(copy.deepcopy(base), one)
    pm.save_pretrained(directory)
    meta_path = os.path.join(directory, CONFIG_NAME)
    with open(meta_path) as f:
        meta = json.load(f)
    meta["config"]["num_users"] = cfg.num_users
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    entries = [(k, v.dtype, tuple(v.shape), [v]) for k, v in pm._shared_adapter_tensors().items()]
    entries += [(k, dt, (cfg.num_users,) + tuple(shape[1:]), None) for k, dt, shape, _ in pm.user_bank.save_entries()]
    write_safetensors(os.path.join(directory, WEIGHTS_NAME), entries, {"format": meta["format"]})
    return directory


def build(base, N: int, bank: str, cache: int, r_u: int, device, mmap_dir: Optional[str] = None):
    """A ProperModel of ``base`` in the user stage with N users (a paged bank mapped
    from a sparse file in ``mmap_dir`` when given)."""
    from proper_kernels.integrations import ProperModel, get_proper_model

    cfg = proper_config(N, r_u, bank, cache)
    if bank == "paged" and mmap_dir:
        d = sparse_bank_dir(os.path.join(mmap_dir, f"bank-{N}"), base, cfg, device)
        pm = ProperModel.from_pretrained(base, d, mmap=True)
    else:
        pm = get_proper_model(base, cfg)
    pm.set_stage("user")  # the rows' values (B_u = 0 at the start) do not change the work timed
    return pm.to(device)


def measure(pm, batches: Sequence[torch.Tensor], mode: str, T: int, new_tokens: int, warmup: int, device,
            vocab: int) -> Dict[str, float]:
    """Run ``batches`` (the first ``warmup`` untimed); tokens/s at the median step, the
    median and mean step and, for a paged bank, hit rate and bytes moved per timed batch."""
    g = torch.Generator().manual_seed(1)
    k = batches[0].numel()
    ids = torch.randint(1, vocab, (k, T), generator=g).to(device)
    bank = pm.user_bank
    if mode == "train-step":
        opt = pm.make_optimizer(lr=1e-4, weight_decay=0.0)
        pm.train()

        def step(users):
            out = pm(input_ids=ids, labels=ids, user_ids=users)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        tokens = k * T
    else:
        pm.eval()
        prompt = ids[:, : max(1, T // 2)]
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        def step(users):
            pm.generate(input_ids=prompt, user_ids=users, **gen)
        tokens = k * new_tokens
    times = []
    before = dict(getattr(bank, "stats", {}))
    for i, users in enumerate(batches):
        if i == warmup:
            before = dict(getattr(bank, "stats", {}))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(users)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]  # robust to a loaded machine's outliers
    out = dict(tokens_per_s=tokens / median, median_ms=1e3 * median, mean_ms=1e3 * sum(times) / len(times),
               device_bytes=bank.device_bytes(), host_bytes=bank.host_bytes())
    stats = getattr(bank, "stats", None)
    if stats:
        d = {key: stats[key] - before.get(key, 0) for key in stats}
        looked = d["hits"] + d["misses"]
        out.update(hit_rate=d["hits"] / looked if looked else 1.0,
                   bytes_per_batch=(d["bytes_to_device"] + d["bytes_to_host"]) / max(1, d["batches"]))
    return out


def resident_fits(N: int, per_user: int, device, limit_gb: float) -> bool:
    """Whether rows, gradients and two AdamW moments of N users fit in ``limit_gb``."""
    need = 4 * N * per_user
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < min(free * 0.5, limit_gb * 2 ** 30)
    return need < limit_gb * 2 ** 30


def run_rows(N: int, mode: str, *, cache: int, active: int, steps: int, warmup: int, T: int, new_tokens: int,
             r_u: int, device, dtype, limit_gb: float, mmap_dir: Optional[str] = None,
             resident: bool = True) -> List[Dict[str, object]]:
    """The paged row (and the resident one, where it fits) of one N and mode."""
    batches = zipf_batches(N, active, warmup + steps)
    cache = min(cache, N)  # more slots than users would only cost memory
    rows = []
    for bank in ("paged", "resident") if resident else ("paged",):
        row: Dict[str, object] = dict(N=N, mode=mode, bank=bank, cache=cache if bank == "paged" else N,
                                      active=min(active, N))
        pm = None
        try:
            base = base_model(device, dtype)
            per_user = bytes_per_user(base, r_u)
            row["user_mb"] = per_user / 2 ** 20
            if bank == "resident" and not resident_fits(N, per_user, device, limit_gb):
                row["status"] = (f"skipped: {4 * N * per_user / 2 ** 30:.1f} GiB of rows, grads and AdamW state "
                                 f"> the resident limit")
            else:
                pm = build(base, N, bank, cache, r_u, device, mmap_dir)
                row.update(measure(pm, batches, mode, T, new_tokens, warmup, device, pm.config.vocab_size))
                row["status"] = "ok"
        except (RuntimeError, ValueError, MemoryError) as exc:  # out of memory, a bad flag: report the row
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
        del pm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        peer = [p for p in rows if p is not r and p.get("tokens_per_s")]
        if peer and r.get("tokens_per_s"):
            r["x_resident"] = r["tokens_per_s"] / peer[0]["tokens_per_s"] if r["bank"] == "paged" else 1.0
    return rows


def _fmt_bytes(n) -> str:
    if n in (None, ""):
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def table(rows: Sequence[Dict[str, object]]) -> str:
    head = ["N", "mode", "bank", "C", "tok/s", "x res", "step ms", "hit", "moved/batch", "device", "host"]
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append([f"{r['N']:,}", r["mode"], r["bank"], str(r["cache"]), str(r.get("status"))])
            continue
        lines.append([f"{r['N']:,}", r["mode"], r["bank"], f"{r['cache']:,}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['x_resident']:.2f}" if "x_resident" in r else "-", f"{r['median_ms']:.1f}",
                      f"{r['hit_rate']:.2f}" if "hit_rate" in r else "-", _fmt_bytes(r.get("bytes_per_batch")),
                      _fmt_bytes(r["device_bytes"]), _fmt_bytes(r["host_bytes"])])
    widths = [max(len(l[i]) for l in lines if len(l) > i and (len(l) == len(head) or i < len(l) - 1))
              for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(widths[i]) if i < len(l) - 1 or len(l) == len(head) else c
                               for i, c in enumerate(l)) for l in lines)


def run_paged_case(case, args, device, dtype, base_row) -> List[dict]:
    """benchmarks/run.py's rows of one ``paged`` case (provider = the bank)."""
    from report import new_row

    cache = getattr(args, "user_cache_size", None) or case.cache
    out = []
    for r in run_rows(case.N, case.mode, cache=cache, active=case.active, steps=6, warmup=2, T=case.T,
                      new_tokens=case.new_tokens, r_u=case.r_u, device=device, dtype=dtype, limit_gb=8.0):
        note = ""
        if r["status"] == "ok":
            note = (f"C={r['cache']}; device {_fmt_bytes(r['device_bytes'])}, host {_fmt_bytes(r['host_bytes'])}"
                    + (f"; hit {r['hit_rate']:.2f}, {_fmt_bytes(r['bytes_per_batch'])}/batch" if "hit_rate" in r
                       else ""))
        out.append(new_row(base_row, provider=r["bank"], users=r["active"], refcheck="n/a", status=r["status"],
                           median_ms=r.get("median_ms", ""), tokens_per_s=r.get("tokens_per_s", ""), note=note,
                           timer="wall"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default=",".join(map(str, USER_COUNTS)), help="comma list of N")
    ap.add_argument("--cache-size", type=int, default=256, help="C: device slots per layer (>= --active)")
    ap.add_argument("--active", type=int, default=64, help="distinct users per batch (one row each)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=10, help="timed batches per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    ap.add_argument("--seq", type=int, help="tokens per row (default 16 on CPU, 128 on GPU)")
    ap.add_argument("--new-tokens", type=int, help="generated tokens (default 4 on CPU, 16 on GPU)")
    ap.add_argument("--rank", type=int, default=8, help="user LoRA rank r_u")
    ap.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--mmap", metavar="DIR", help="map the host bank from a sparse safetensors file in DIR")
    ap.add_argument("--resident-limit-gb", type=float, default=4.0, help="largest resident bank to time")
    ap.add_argument("--no-resident", action="store_true", help="paged rows only")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or ("bfloat16" if gpu else "float32")]
    users = [int(v) for v in args.users.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or args.cache_size < args.active:
        print(f"error: modes must be among {MODES}; --cache-size must be >= --active", file=sys.stderr)
        return 2
    if not gpu:
        torch.set_num_threads(1 if os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5 else torch.get_num_threads())
    T, new = args.seq or (128 if gpu else 16), args.new_tokens or (16 if gpu else 4)
    print(f"paged user bank: {device} {str(dtype).replace('torch.', '')}, Llama {llama_dims(gpu)['hidden_size']}d x "
          f"{llama_dims(gpu)['num_hidden_layers']} layers, user LoRA r_u={args.rank} on {'/'.join(TARGETS)}, "
          f"{args.active} users a batch (Zipf), C={args.cache_size}, seq {T}, {new} new tokens", flush=True)
    rows = []
    for N in users:
        for mode in modes:
            rows += run_rows(N, mode, cache=args.cache_size, active=args.active, steps=args.steps,
                             warmup=args.warmup, T=T, new_tokens=new, r_u=args.rank, device=device, dtype=dtype,
                             limit_gb=args.resident_limit_gb, mmap_dir=args.mmap, resident=not args.no_resident)
            print(f"  N={N:,} {mode}: " + ", ".join(f"{r['bank']} {r['status']}" for r in rows[-2:]), flush=True)
    print()
    print(table(rows))
    print("\nx res: paged tokens/s over resident tokens/s on the same batches.  moved/batch: bytes copied host ->"
          " device and back per batch.\ndevice/host: bytes of the user part (rows, gradients, optimiser state).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
