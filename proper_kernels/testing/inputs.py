"""User-popularity laws and random inputs of one adapted linear, for tests and benchmarks.

Popularity laws decide which user each token of a batch belongs to. Punica's four
workloads (Distinct, Uniform, Skewed, Identical; Chen et al. 2023) are ``distinct``,
``punica-uniform``, ``punica-skewed`` and ``identical``, exactly: contiguous segments
of the batch, one user each, as in its benchmarks. The others are random draws:

* ``distinct``        every token a different user (cycling 0, 1, ..., N-1, 0, ... when T > N)
* ``uniform``         each token's user drawn uniformly from [0, N)
* ``zipf``            users ranked by a random permutation, rank k drawn with p ∝ k^-1.5
* ``identical``       every token the same user
* ``skewed``          half of the tokens one user, the rest uniform, positions shuffled
* ``punica-uniform``  ceil(sqrt(T)) users with equal segments (the first T mod n one longer)
* ``punica-skewed``   segments of floor(1.5^k) tokens, k = 0, 1, ..., while they fit, the
                      remainder one more segment; longest first, a different user each

Segments of the punica laws get distinct users, drawn at random (cycling when there
are more segments than users).

Nothing here imports triton, transformers or peft.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["POPULARITY_LAWS", "ZIPF_ALPHA", "punica_segments", "sample_user_ids", "make_mixture_inputs",
           "MIXTURE_PARAM_NAMES", "MixtureCase", "mixture_case", "at_fp64_and_fp32"]

POPULARITY_LAWS = ("distinct", "uniform", "zipf", "identical", "skewed", "punica-uniform", "punica-skewed")
ZIPF_ALPHA = 1.5

# The keyword tensors of ``proper_kernels.lora_mixture`` that make_mixture_inputs fills.
MIXTURE_PARAM_NAMES = ("expert_A", "expert_B", "router_weight", "user_logit_bias", "user_A", "user_B", "user_router")


def punica_segments(T: int, law: str) -> list:
    """Segment lengths (tokens per user, in batch order) of Punica's ``punica-uniform``
    or ``punica-skewed`` workload for a batch of T tokens; they add up to T."""
    if T == 0:
        return []
    if law == "punica-uniform":
        n = math.isqrt(T - 1) + 1  # ceil(sqrt(T))
        base, extra = divmod(T, n)
        return [base + 1] * extra + [base] * (n - extra)
    if law != "punica-skewed":
        raise ValueError(f"{law!r} is not a segment law (punica-uniform, punica-skewed)")
    lens, a = [], 1.0
    while sum(lens) + math.floor(a) < T:
        lens.append(math.floor(a))
        a *= ZIPF_ALPHA
    lens.append(T - sum(lens))
    return sorted(lens, reverse=True)


def sample_user_ids(T: int, N: int, law: str, generator: Optional[torch.Generator] = None,
                    device: torch.device | str = "cpu") -> Tensor:
    """Draw the user of each of T tokens from a bank of N users by a popularity law.

    Args:
        T: number of tokens (>= 0).
        N: number of users (>= 1).
        law: one of :data:`POPULARITY_LAWS`.
        generator: a CPU ``torch.Generator`` for reproducible draws (None: global RNG).
        device: where the result lives (drawn on CPU, then moved).

    Returns:
        int64 [T], values in [0, N).
    """
    if law not in POPULARITY_LAWS:
        raise ValueError(f"unknown popularity law {law!r}; valid laws: {', '.join(POPULARITY_LAWS)}")
    if not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be a non-negative int, got {T!r}")
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive int, got {N!r}")
    g = generator
    if law == "distinct":
        ids = torch.arange(T, dtype=torch.int64) % N
    elif law == "uniform":
        ids = torch.randint(0, N, (T,), generator=g, dtype=torch.int64)
    elif law == "zipf":
        ranks = torch.arange(1, N + 1, dtype=torch.float64)
        p = ranks.pow(-ZIPF_ALPHA)
        draws = torch.multinomial(p / p.sum(), T, replacement=True, generator=g) if T else torch.zeros(0, dtype=torch.int64)
        perm = torch.randperm(N, generator=g)  # which user holds rank 1, 2, ...
        ids = perm[draws]
    elif law.startswith("punica-"):
        lens = torch.tensor(punica_segments(T, law), dtype=torch.int64)
        perm = torch.randperm(N, generator=g)
        users = perm[torch.arange(lens.numel()) % N]
        ids = torch.repeat_interleave(users, lens)
    elif law == "identical":
        hot = int(torch.randint(0, N, (1,), generator=g))
        ids = torch.full((T,), hot, dtype=torch.int64)
    else:  # skewed
        hot = int(torch.randint(0, N, (1,), generator=g))
        n_hot = T // 2 + T % 2
        rest = torch.randint(0, N, (T - n_hot,), generator=g, dtype=torch.int64)
        ids = torch.cat([torch.full((n_hot,), hot, dtype=torch.int64), rest])
        ids = ids[torch.randperm(T, generator=g)]
    return ids.to(torch.int64).to(device)


def make_mixture_inputs(
    T: int, d_in: int, d_out: int, *, K: int = 4, r: int = 8, r_u: int = 8, N: int = 16,
    law: str = "uniform", dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    seed: int = 0, bias: bool = True, router: bool = True, user_bias: bool = True,
    user_router: bool = True,
) -> Dict[str, object]:
    """Random, well-scaled inputs of one adapted linear, as ``lora_mixture`` keywords.

    Every B matrix and the LoRA-aware router are non-zero (unlike a fresh layer), so
    every term of the formula contributes and a wrong kernel shows. Output magnitudes
    are O(1) for x ~ N(0, 1).

    Returns a dict with ``x`` [T, d_in], ``weight`` [d_out, d_in], ``bias`` [d_out] or
    None, ``expert_A`` [K, r, d_in], ``expert_B`` [K, d_out, r], ``router_weight``
    [K, d_in], ``user_ids`` int64 [T], ``user_logit_bias`` [N, K], ``user_A`` [N, r_u, d_in],
    ``user_B`` [N, d_out, r_u], ``user_router`` [N, K, r_u], ``expert_scale``,
    ``user_scale`` (floats); absent parts (K=0, r_u=0, flags off) are None.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device=device)

    out: Dict[str, object] = {
        "x": rnd(T, d_in),
        "weight": rnd(d_out, d_in, std=d_in ** -0.5),
        "bias": rnd(d_out, std=0.1) if bias else None,
        "expert_A": None, "expert_B": None, "router_weight": None,
        "user_ids": sample_user_ids(T, N, law, generator=g, device=device),
        "user_logit_bias": None, "user_A": None, "user_B": None, "user_router": None,
        "expert_scale": 2.0, "user_scale": 2.0,
    }
    if K:
        out["expert_A"] = rnd(K, r, d_in, std=d_in ** -0.5)
        out["expert_B"] = rnd(K, d_out, r, std=0.5 * r ** -0.5)
        if router:
            out["router_weight"] = rnd(K, d_in, std=d_in ** -0.5)
        if user_bias:
            out["user_logit_bias"] = rnd(N, K, std=0.5)
    if r_u:
        out["user_A"] = rnd(N, r_u, d_in, std=d_in ** -0.5)
        out["user_B"] = rnd(N, d_out, r_u, std=0.5 * r_u ** -0.5)
        if K and user_router:
            out["user_router"] = rnd(N, K, r_u, std=0.3 * r_u ** -0.5)
    return out


# One adapted linear in the internal API's form (x, weight, bias, Adapters, user_ids),
# and the oracle pair of the tolerance rule: the reference in fp64 (the exact oracle)
# and in fp32 (the baseline) on the same, already rounded, inputs.


class MixtureCase(NamedTuple):
    """Inputs of one adapted linear: x [T, d_in], W0 [d_out, d_in] or None, b [d_out]
    or None, the :class:`~proper_kernels.reference.adapters.Adapters`, user_ids int64
    [T] or None (None when no tensor is indexed by user), the bank size N, d_out."""

    x: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    adapters: object  # proper_kernels.reference.adapters.Adapters
    user_ids: Optional[Tensor]
    N: int
    d_out: int

    def kwargs(self) -> Dict[str, object]:
        """The adapter keywords of ``proper_kernels.lora_mixture`` (with user_ids)."""
        return dict(self.adapters._asdict(), user_ids=self.user_ids)

    def to(self, dtype: torch.dtype) -> "MixtureCase":
        """Every floating tensor (adapters included) converted to ``dtype``."""
        f = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
        return self._replace(x=f(self.x), weight=f(self.weight), bias=f(self.bias), adapters=self.adapters.to(dtype))

    def plan(self):
        """The RoutingPlan of user_ids (None without user-indexed tensors)."""
        from proper_kernels.ops.plan import RoutingPlan

        return RoutingPlan(self.user_ids, self.N) if self.user_ids is not None else None


def mixture_case(T: int, d_in: int, d_out: int, K: int = 3, r: int = 4, r_u: int = 6, N: int = 5,
                 law: str = "uniform", *, no_user: float = 0.2, dtype: torch.dtype = torch.float32, seed: int = 0,
                 weight: bool = True, bias: bool = True, router: bool = True, user_bias: bool = True,
                 user_router: bool = True, expert_scale: float = 0.75, user_scale: float = 1.25,
                 top_k: Optional[int] = None, shuffle: bool = True, device: torch.device | str = "cpu") -> MixtureCase:
    """A :class:`MixtureCase` from :func:`make_mixture_inputs` (K = 0: no experts,
    r_u = 0: no user adapters, flags off: no such tensor), with a fraction ``no_user``
    of the tokens without a user (id -1) and, with ``shuffle``, the ids permuted so a
    user's tokens are not contiguous in x (the plan must gather). N = 0: no user bank."""
    from proper_kernels.reference.adapters import Adapters

    if N == 0:  # no user bank: no user-indexed tensor
        r_u, user_bias = 0, False
    m = make_mixture_inputs(T, d_in, d_out, K=K, r=r, r_u=r_u, N=max(N, 1), law=law, dtype=dtype, device=device,
                            seed=seed, bias=bias, router=router, user_bias=user_bias, user_router=user_router)
    adapters = Adapters.from_kwargs(m)._replace(expert_scale=expert_scale, user_scale=user_scale, top_k=top_k)
    ids = None
    if adapters.has_user_terms:
        g = torch.Generator().manual_seed(seed + 1)
        ids = m["user_ids"].cpu()
        if shuffle:
            ids = ids[torch.randperm(T, generator=g)]
        if no_user:
            ids = torch.where(torch.rand(T, generator=g) < no_user, torch.full_like(ids, -1), ids)
        ids = ids.to(device)
    return MixtureCase(m["x"], m["weight"] if weight else None, m["bias"], adapters, ids, N, d_out)


def _to_precision(v, dtype: torch.dtype):
    from proper_kernels.reference.adapters import Adapters

    if isinstance(v, Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, (Adapters, MixtureCase)):
        return v.to(dtype)
    return v


def at_fp64_and_fp32(fn, *args, **kwargs):
    """(fn in fp64, fn in fp32): ``fn`` called with every floating tensor among the
    arguments (also inside an Adapters or a MixtureCase) converted to float64, then to
    float32. With a
    reference as ``fn``, the two results are the ``ref`` and ``baseline`` of
    :func:`assert_close` for a kernel run on the same (rounded) inputs."""
    return tuple(fn(*(_to_precision(a, dtype) for a in args), **{k: _to_precision(v, dtype) for k, v in kwargs.items()})
                 for dtype in (torch.float64, torch.float32))

