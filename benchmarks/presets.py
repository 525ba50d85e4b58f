"""Shape presets of the benchmark and the cases they expand to.

A preset fixes the dims (d_in, d_out or d_model/d_ff, K, r, r_u, N) and, per op, the
token counts and popularity laws of its cases. ``--popularity`` replaces every case's
laws; ``--op`` keeps only some ops.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

OPS = ("fwd", "fwdbwd", "decode", "mlp", "e2e", "paged")
OP_DOC = {
    "fwd": "mixture forward of one adapted linear (prefill token counts, no grad)",
    "fwdbwd": "mixture forward + backward (grads of x and every adapter/router tensor; W0 frozen)",
    "decode": "mixture forward at decode token counts (no grad; CUDA graphs for tiny T on GPU)",
    "mlp": "gated MLP down(silu(gate(x)) * up(x)) of three adapted linears, forward or train",
    "e2e": "tokens/s of a stage-3 training step and of generation on a Llama (proper_kernels.integrations)",
    "paged": "tokens/s with N users in a paged host bank and C device slots vs all resident (benchmarks/paged.py)",
}
MODE_OF = {"fwd": "prefill", "decode": "decode", "fwdbwd": "train"}


@dataclass
class Case:
    """One benchmark case: an op at one shape, token count and popularity law."""
    index: int
    op: str
    mode: str
    T: int
    d_in: int
    d_out: int
    K: int
    r: int
    r_u: int
    N: int
    law: str
    grad: bool
    d_ff: int = 0          # mlp only: d_in = d_out = d_model
    new_tokens: int = 0    # e2e generate only
    loop_users: int = 0    # e2e loop: users timed one at a time (0: all N; tokens/s is a rate)
    cache: int = 0         # paged: device slots C per layer
    active: int = 0        # paged: distinct users per batch

    def shape(self) -> str:
        if self.op == "paged":
            return f"seq={self.T} users={self.active}/{self.N} C={self.cache} r_u={self.r_u}"
        if self.op == "e2e":  # T is the sequence length of each of the N users' rows
            dims = f"seq={self.T}" + (f" new={self.new_tokens}" if self.mode == "generate" else "")
        elif self.op == "mlp":
            dims = f"T={self.T} d={self.d_in} ff={self.d_ff}"
        else:
            dims = f"T={self.T} {self.d_in}->{self.d_out}"
        return f"{dims} K={self.K} r={self.r} r_u={self.r_u} N={self.N}"

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


# Each op entry: a list of (token counts, laws) groups; mlp/fwd groups may carry their
# own dims ("dims": (d_in, d_out)) and mlp groups a "grad" flag.
PRESETS: Dict[str, Dict[str, object]] = {
    "cpu-small": {
        "doc": "small dims for CPU (the default without a GPU): every op in about a minute on 2 cores",
        "dtype": "float32",
        "dims": dict(d_in=256, d_out=320, K=4, r=8, r_u=8, N=16),
        "mlp": dict(d_model=128, d_ff=344),
        "e2e": dict(N=64, T=8, new_tokens=4, K=4, r=8, r_u=8, loop_users=8),
        "ops": {
            "fwd": [((64,), ("uniform",)), ((256,), ("identical",))],
            "decode": [((1,), ("uniform",)), ((16,), ("distinct",))],
            "fwdbwd": [((64,), ("zipf",))],
            "mlp": [((32,), ("uniform",), False), ((32,), ("uniform",), True)],
            "e2e": [("train-step",), ("generate",)],
        },
    },
    "square-4096": {
        "doc": "one 4096->4096 projection, K=8, r=16, r_u=16, 64 users (H100 decode floor at T=64: 18.9 MB of adapters, ~6 us; GPU default)",
        "dtype": "bfloat16",
        "dims": dict(d_in=4096, d_out=4096, K=8, r=16, r_u=16, N=64),
        "ops": {
            "decode": [((1, 16, 64, 256), ("distinct", "uniform")),
                       ((64,), ("zipf", "identical", "skewed", "punica-uniform", "punica-skewed"))],
            "fwd": [((1024, 8192), ("uniform",)), ((8192,), ("zipf", "identical"))],
            "fwdbwd": [((1024, 8192), ("uniform",)), ((8192,), ("zipf",))],
        },
    },
    "llama-7b-mlp": {
        "doc": "Llama-7B MLP 4096 <-> 11008 (gate/up/down), K=8, r=16, r_u=16, 64 users",
        "dtype": "bfloat16",
        "dims": dict(d_in=4096, d_out=11008, K=8, r=16, r_u=16, N=64),
        "mlp": dict(d_model=4096, d_ff=11008),
        "ops": {
            "decode": [((1, 64), ("uniform",), (4096, 11008)), ((1, 64), ("uniform",), (11008, 4096))],
            "fwd": [((1024, 4096), ("uniform",), (4096, 11008)), ((1024, 4096), ("uniform",), (11008, 4096))],
            "fwdbwd": [((1024,), ("uniform",), (4096, 11008)), ((1024,), ("uniform",), (11008, 4096))],
            "mlp": [((1024, 4096), ("uniform",), False), ((1024,), ("uniform",), True)],
        },
    },
    "e2e": {
        "doc": "tokens/s: stage-3 train step (64 users in one batch vs one at a time) and generation "
               "(one batch vs PEFT mixed batch); tiny random Llama on CPU, ~1B-like on GPU",
        "dtype": None,  # float32 on CPU, bfloat16 on GPU
        "e2e": dict(N=64, T=16, new_tokens=8, K=4, r=8, r_u=8, loop_users=16),
        "e2e_gpu": dict(N=64, T=128, new_tokens=32, K=8, r=16, r_u=16),
        "ops": {"e2e": [("train-step",), ("generate",)]},
    },
    "paged": {
        "doc": "paged user bank: N = 64, 1k, 10k, 100k users, 64 a batch (Zipf), C = 256 slots (--user-cache-size); "
               "tiny Llama on CPU, Llama-7B-like q/v at r_u = 8 on GPU",
        "dtype": None,
        "paged": dict(T=16, new_tokens=4, r_u=8, cache=256, active=64, users=(64, 1000, 10000, 100000)),
        "paged_gpu": dict(T=128, new_tokens=16, r_u=8, cache=256, active=64, users=(64, 1000, 10000, 100000)),
        "ops": {"paged": [("train-step",), ("generate",)]},
    },
}


def default_preset(device_type: str) -> str:
    return "square-4096" if device_type == "cuda" else "cpu-small"


def build_cases(preset: str, ops: Optional[Sequence[str]], laws: Optional[Sequence[str]],
                device_type: str = "cpu") -> List[Case]:
    """Expand a preset into its cases, numbered in order (``--case`` picks one by index;
    the numbering depends on the preset and ``laws`` only, not on ``ops``).

    ops: keep only these ops (None: all the preset has). laws: replace the preset's
    popularity laws (None: the preset's own).
    """
    spec = PRESETS[preset]
    dims = spec.get("dims", {})
    out: List[Case] = []
    for op in OPS:
        if op not in spec["ops"]:
            continue
        seen = set()
        for group in spec["ops"][op]:
            if op == "paged":
                e = spec.get("paged_gpu") if device_type == "cuda" else spec["paged"]
                mode = group[0]
                for N in e["users"]:
                    out.append(Case(len(out), op, mode, e["T"], 0, 0, 0, 0, e["r_u"], N, "zipf",
                                    grad=mode == "train-step", new_tokens=e["new_tokens"] if mode == "generate" else 0,
                                    cache=e["cache"], active=e["active"]))
                continue
            if op == "e2e":
                e = spec.get("e2e_gpu") if device_type == "cuda" and "e2e_gpu" in spec else spec["e2e"]
                mode = group[0]
                for law in ("distinct",):  # one row per user: every user present once
                    out.append(Case(len(out), op, mode, e["T"], 0, 0, e["K"], e["r"], e["r_u"], e["N"], law,
                                    grad=mode == "train-step", new_tokens=e["new_tokens"] if mode == "generate" else 0,
                                    loop_users=e.get("loop_users", 0)))
                continue
            Ts, glaws = group[0], group[1]
            if op == "mlp":
                grad = group[2]
                d_in = d_out = spec["mlp"]["d_model"]
                d_ff = spec["mlp"]["d_ff"]
                mode = "train" if grad else "prefill"
            else:
                d_in, d_out = group[2] if len(group) > 2 else (dims["d_in"], dims["d_out"])
                d_ff, grad, mode = 0, op == "fwdbwd", MODE_OF[op]
            for T in Ts:
                for law in (laws or glaws):
                    key = (T, law, d_in, d_out, grad)
                    if key in seen:  # --popularity can make groups collide
                        continue
                    seen.add(key)
                    out.append(Case(len(out), op, mode, T, d_in, d_out, dims["K"], dims["r"], dims["r_u"],
                                    dims["N"], law, grad=grad, d_ff=d_ff))
    # Indices are numbered over all the preset's ops, so --case N means the same case
    # whatever --op selects.
    return [c for c in out if ops is None or c.op in ops]
