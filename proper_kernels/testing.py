"""Helpers shared by tests and benchmarks: user-popularity laws, random mixtures and
the one tolerance rule of every comparison with the oracle.

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
           "MIXTURE_PARAM_NAMES", "TOL_FACTOR", "TOL_ULPS", "tolerance", "compare", "assert_close"]

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


# --------------------------------------------------------------------------- tolerance
# One rule for every comparison of a kernel with the oracle, in the tests and in the
# benchmark's reference check (after flash-attention's criterion): a result is right
# when its error against the exact oracle is at most FACTOR times the error that a
# plain computation of lower precision makes on the same inputs, plus a floor of
# ULPS units of the output dtype's eps (for outputs the plain computation gets exactly
# right). The floor stays a few ulps: a wide one lets a missing term through.
TOL_FACTOR = 3.0
TOL_ULPS = 4


def tolerance(ref: Tensor, baseline: Tensor, dtype: torch.dtype, *, factor: float = TOL_FACTOR,
              ulps: float = TOL_ULPS) -> float:
    """Allowed max abs error of a result of ``dtype`` against ``ref`` (the exact
    oracle: fp64 in the tests, the fp32 reference in the benchmark), given
    ``baseline``, the plain computation of lower precision on the same inputs (the fp32
    reference in the tests, the same-dtype per-user loop in the benchmark)."""
    if ref.numel() == 0:
        return 0.0
    ref = ref.detach().double()
    base_err = float((baseline.detach().double() - ref).abs().max())
    return factor * base_err + ulps * torch.finfo(dtype).eps * max(float(ref.abs().max()), 1.0)


def compare(name: str, out: Tensor, ref: Tensor, baseline: Tensor, *, dtype: Optional[torch.dtype] = None,
            factor: float = TOL_FACTOR, ulps: float = TOL_ULPS):
    """(ok, err, tol, message) of ``out`` against ``ref`` under :func:`tolerance`.

    ``dtype`` is the precision the result was computed in (default: ``out.dtype``)."""
    if tuple(out.shape) != tuple(ref.shape):
        return False, float("nan"), float("nan"), f"{name}: shape {list(out.shape)} != {list(ref.shape)}"
    if ref.numel() == 0:
        return True, 0.0, 0.0, ""
    tol = tolerance(ref, baseline, dtype or out.dtype, factor=factor, ulps=ulps)
    err = float((out.detach().double() - ref.detach().double()).abs().max())
    if not math.isfinite(err) or err > tol:
        return False, err, tol, f"{name}: max err {err:.3g} > tol {tol:.3g}"
    return True, err, tol, ""


def assert_close(name: str, out: Tensor, ref: Tensor, baseline: Tensor, *, dtype: Optional[torch.dtype] = None,
                 factor: float = TOL_FACTOR, ulps: float = TOL_ULPS) -> None:
    """Raise AssertionError naming ``name`` when :func:`compare` fails."""
    ok, _, _, msg = compare(name, out, ref, baseline, dtype=dtype, factor=factor, ulps=ulps)
    assert ok, msg


# --------------------------------------------------------------------------- Hugging Face integration
# Tiny random causal LMs, adapters and data for the tests of proper_kernels.integrations.
# transformers, peft and the integration package are imported inside the functions.
__all__ += ["TINY_VOCAB", "tiny_causal_lm", "tiny_proper_config", "randomize_adapters", "trained_proper_model",
            "left_pad", "random_token_seqs", "counting_corpus", "collate_lm", "tiny_training_args",
            "random_peft_lora"]

TINY_VOCAB = 97
ADAPTER_B_NAMES = ("population_B", "expert_B", "user_B", "user_router", "user_embedding")


def tiny_causal_lm(arch: str = "llama", seed: int = 0, *, tie_word_embeddings: bool = False):
    """A random 2-layer ``arch`` ("llama", "qwen2" or "mistral") causal LM in eval mode:
    hidden 32, MLP 48, 4 heads, 2 kv heads, vocab :data:`TINY_VOCAB`, pad 0, bos 1, eos 2."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM")}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = (getattr(transformers, n) for n in classes[arch])
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings)
    if arch == "mistral":
        cfg.sliding_window = None
    return model_cls(cfg).eval()


def tiny_proper_config(**overrides):
    """A ProperConfig sized for :func:`tiny_causal_lm`: 3 experts of rank 2, 4 users of
    rank 2, user embeddings of 4, population rank 4 (every alpha = 2 * rank), the
    reference backend; ``overrides`` replace any field."""
    from proper_kernels.integrations import ProperConfig

    fields = dict(num_experts=3, expert_rank=2, expert_alpha=4.0, num_users=4, user_rank=2, user_alpha=4.0,
                  user_embed_dim=4, population_rank=4, population_alpha=8.0, backend="reference")
    fields.update(overrides)
    return ProperConfig(**fields)


@torch.no_grad()
def randomize_adapters(pm, seed: int = 1, scale: float = 0.3, names=ADAPTER_B_NAMES) -> None:
    """Give the adapter tensors ``names`` of every adapted layer of ``pm`` random
    N(0, scale^2) values, as after training (by default the ones that start at zero:
    every B, V_u, and e_u). Parts a layer does not have are skipped."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in pm.adapted_layers():
        for name in names:
            p = getattr(layer, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def trained_proper_model(arch: str = "llama", **config_overrides):
    """(ProperModel of a :func:`tiny_causal_lm` in the user stage, every stage's
    adapters random; an untouched copy of the base model, for reloading)."""
    import copy

    from proper_kernels.integrations import get_proper_model

    base = tiny_causal_lm(arch)
    orig = copy.deepcopy(base)
    pm = get_proper_model(base, tiny_proper_config(**config_overrides))
    for seed, stage in enumerate(("population", "group", "user"), start=1):
        pm.set_stage(stage)
        randomize_adapters(pm, seed=seed)
    return pm, orig


def left_pad(seqs, pad: int = 0):
    """(input_ids, attention_mask, position_ids), each int64 [len(seqs), longest], of
    token lists padded on the left."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def random_token_seqs(lengths, seed: int = 0) -> list:
    """One list of random token ids in [3, TINY_VOCAB) per length (0-2 are pad, bos, eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in lengths]


def counting_corpus(n: int = 32, L: int = 10, seed: int = 0) -> list:
    """``n`` rows ``{"input_ids": int64 [L], "user_ids": u}`` of two users with opposite
    habits: user 0 counts up from a random start, user 1 counts down."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        u = i % 2
        start = int(torch.randint(10, 80, (1,), generator=g))
        step = 1 if u == 0 else -1
        rows.append({"input_ids": torch.tensor([start + step * j for j in range(L)]), "user_ids": u})
    return rows


def collate_lm(rows) -> Dict[str, Tensor]:
    """A batch (input_ids, labels = input_ids, user_ids) of :func:`counting_corpus` rows."""
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone(), "user_ids": torch.tensor([r["user_ids"] for r in rows])}


def tiny_training_args(output_dir, **overrides):
    """``transformers.TrainingArguments`` for a few CPU steps: batch 8, no saving, no
    logging, no reporting, every column kept for ProperModel's user_ids."""
    from transformers import TrainingArguments

    kw = dict(output_dir=str(output_dir), per_device_train_batch_size=8, save_strategy="no", logging_strategy="no",
              report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    kw.update(overrides)
    return TrainingArguments(**kw)


def random_peft_lora(base, r: int, alpha: float, target_modules=("gate_proj", "up_proj", "down_proj"), *,
                     use_rslora: bool = False, seed: int = 5):
    """``peft.get_peft_model(base, LoraConfig(...))`` (``base`` is wrapped in place)
    with random lora_B weights (N(0, 0.09)), so the adapter changes the output; eval mode."""
    import peft

    lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                           task_type="CAUSAL_LM", use_rslora=use_rslora)
    model = peft.get_peft_model(base, lcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


# --------------------------------------------------------------------------- core op and kernel tests
# One adapted linear in the internal API's form (x, weight, bias, Adapters, user_ids),
# and the oracle pair of the tolerance rule: the reference in fp64 (the exact oracle)
# and in fp32 (the baseline) on the same, already rounded, inputs.
__all__ += ["MixtureCase", "mixture_case", "at_fp64_and_fp32"]


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


# --------------------------------------------------------------------------- CUDA decode kernel tests
# For tests/test_cuda_*.py: the build helper python/build_cuda.py and the CPU emulation
# of csrc/ it builds, a random decode case in the keyword form of
# ``proper_kernels.lora_mixture``, the per-token oracle, and call_decode, the one
# function through which the tests call proper_kernels.ops.cuda_decode and the
# reference (it maps the keyword form onto the internal API's Adapters).
__all__ += ["repo_root", "load_build_cuda", "load_emulator", "emulator_or_skip", "make_decode_case",
            "decode_loop_ref", "decode_batched_ref", "call_decode", "DecodeRunner", "assert_decode_close"]


def repo_root() -> str:
    """The checkout this package is imported from (an editable install)."""
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_build_cuda_module = None
_emulators: Dict[tuple, object] = {}


def load_build_cuda():
    """python/build_cuda.py of :func:`repo_root`, imported once per process (it is a
    script beside the package, never installed)."""
    global _build_cuda_module
    if _build_cuda_module is None:
        import importlib.util
        import os

        path = os.path.join(repo_root(), "python", "build_cuda.py")
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} not found: the CUDA build helper needs a checkout (pip install -e .)")
        spec = importlib.util.spec_from_file_location("build_cuda", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _build_cuda_module = mod
    return _build_cuda_module


def load_emulator(defines: tuple = ()):
    """The CPU emulation module ``_C_emu`` of csrc/, imported once per process and set
    of ``defines``; the build itself is cached on disk by a hash of the sources and the
    flags (build/emu/), so only a changed tree or a fresh clone compiles (tens of
    seconds). Raises RuntimeError when it cannot be built."""
    key = tuple(defines)
    if key not in _emulators:
        _emulators[key] = load_build_cuda().load_emulator(repo_root(), defines=key)
    return _emulators[key]


def emulator_or_skip():
    """:func:`load_emulator` for a test fixture: a build failure skips the test, and
    fails it where $CI is set (CI must execute the CUDA kernel in emulation)."""
    import os

    import pytest

    try:
        return load_emulator()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must execute the CUDA kernel in emulation, but the build failed: {exc}")
        pytest.skip(f"cannot build the CPU emulation: {exc}")


def make_decode_case(T=7, d_in=96, d_out=80, K=4, r=8, N=5, r_u=8, dtype=torch.float32, device="cpu",
                     users="distinct", router=True, user_bias=True, user_lora=True, user_router=True,
                     weight=True, bias=True, experts=True, top_k=None, seed=0):
    """(x [T, d_in], W0 [d_out, d_in] or None, b [d_out] or None, kw): a random decode
    case, kw the adapter keywords of ``proper_kernels.lora_mixture`` (tensors, scales
    0.5 / 2.0, top_k, user_ids int64 [T]). ``users``: "distinct" (t mod N),
    "identical" (one user), "with_none" (-1, 0, ..., N-1, -1, ...) or "all_none"."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    kw = {}
    x = rnd(T, d_in)
    W = rnd(d_out, d_in, scale=d_in ** -0.5) if weight else None
    b = rnd(d_out, scale=0.1) if bias else None
    if experts:
        kw.update(expert_A=rnd(K, r, d_in, scale=d_in ** -0.5), expert_B=rnd(K, d_out, r, scale=r ** -0.5),
                  expert_scale=0.5, top_k=top_k)
        if router:
            kw["router_weight"] = rnd(K, d_in, scale=d_in ** -0.5)
    has_users = user_lora or (experts and (user_bias or user_router))
    if has_users:
        if users == "distinct":
            ids = torch.arange(T) % N
        elif users == "identical":
            ids = torch.full((T,), 2 % N)
        elif users == "with_none":
            ids = torch.arange(T) % (N + 1) - 1  # -1, 0, 1, ..., N-1, -1, ...
        elif users == "all_none":
            ids = torch.full((T,), -1)
        else:
            raise ValueError(f"users must be distinct, identical, with_none or all_none, got {users!r}")
        kw["user_ids"] = ids.to(device)
        if experts and user_bias:
            kw["user_logit_bias"] = rnd(N, K)
        if user_lora:
            kw.update(user_A=rnd(N, r_u, d_in, scale=d_in ** -0.5), user_B=rnd(N, d_out, r_u, scale=r_u ** -0.5),
                      user_scale=2.0)
            if experts and user_router:
                kw["user_router"] = rnd(N, K, r_u)
    return x, W, b, kw


def _decode_d_out(weight, bias, expert_B, user_B) -> int:
    for t, dim in ((weight, 0), (bias, 0), (expert_B, 1), (user_B, 1)):
        if t is not None:
            return t.shape[dim]
    raise ValueError("no tensor gives d_out")


def decode_loop_ref(x, weight, bias, *, expert_A=None, expert_B=None, expert_scale=1.0,
                    router_weight=None, user_ids=None, user_logit_bias=None, user_A=None,
                    user_B=None, user_scale=1.0, user_router=None, top_k=None, dtype=torch.float32):
    """(y, gates or None): the formula of DESIGN.md section 1 token by token, every
    tensor cast to `dtype` and every op done in `dtype`: with float32 it is the oracle
    of the decode tests; with x's dtype it is "the same computation in torch"."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router = (
        c(t) for t in (x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router))
    T, d_out = x.shape[0], _decode_d_out(weight, bias, expert_B, user_B)
    K = expert_A.shape[0] if expert_A is not None else 0
    ys, gs = [], []
    for t in range(T):
        xt = x[t]
        u = int(user_ids[t]) if user_ids is not None else -1
        y = torch.zeros(d_out, dtype=dtype, device=x.device)
        if weight is not None:
            y = y + weight @ xt
        if bias is not None:
            y = y + bias
        z = None
        if u >= 0 and user_A is not None:
            z = user_A[u] @ xt
        if K:
            logit = torch.zeros(K, dtype=torch.float32, device=x.device)
            if router_weight is not None:
                logit = logit + (router_weight @ xt).float()
            if u >= 0 and user_logit_bias is not None:
                logit = logit + user_logit_bias[u].float()
            if u >= 0 and user_router is not None:
                logit = logit + (user_router[u] @ z).float()
            kk = K if top_k is None else top_k
            keep = torch.zeros(K, dtype=torch.bool, device=x.device)
            keep[logit.topk(kk).indices] = True
            g = torch.softmax(logit.masked_fill(~keep, float("-inf")), dim=0)
            gs.append(g)
            for k in range(K):
                y = y + expert_scale * g[k].to(dtype) * (expert_B[k] @ (expert_A[k] @ xt))
        if z is not None:
            y = y + user_scale * (user_B[u] @ z)
        ys.append(y)
    gates = torch.stack(gs) if K else None
    return torch.stack(ys), gates


def decode_batched_ref(x, weight, bias, *, expert_A=None, expert_B=None, expert_scale=1.0,
                       router_weight=None, user_ids=None, user_logit_bias=None, user_A=None,
                       user_B=None, user_scale=1.0, user_router=None, top_k=None, dtype=torch.float32):
    """decode_loop_ref's formula for the whole batch at once, in `dtype` the way torch
    on a GPU computes it: every tensor rounded to `dtype`, every product accumulated in
    fp32 (as cuBLAS does) and rounded to `dtype`, sums in `dtype`. The baseline of the
    low-precision tolerance (CPU half-precision matmuls are too slow for it)."""
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731

    def mm(eq, *ops):
        return torch.einsum(eq, *(o.float() for o in ops)).to(dtype)

    x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router = (
        c(t) for t in (x, weight, bias, expert_A, expert_B, router_weight, user_logit_bias, user_A, user_B, user_router))
    T, d_out = x.shape[0], _decode_d_out(weight, bias, expert_B, user_B)
    ids = user_ids.long() if user_ids is not None else torch.full((T,), -1, dtype=torch.long)
    has = (ids >= 0).to(dtype)[:, None]
    idc = ids.clamp(min=0)
    y = torch.zeros(T, d_out, dtype=dtype)
    if weight is not None:
        y = y + mm("td,od->to", x, weight)
    if bias is not None:
        y = y + bias
    z = None
    if user_A is not None:
        z = mm("td,trd->tr", x, user_A[idc]) * has
    K = expert_A.shape[0] if expert_A is not None else 0
    if K:
        logit = torch.zeros(T, K)
        if router_weight is not None:
            logit = logit + mm("td,kd->tk", x, router_weight).float()
        if user_logit_bias is not None:
            logit = logit + (user_logit_bias[idc] * has).float()
        if user_router is not None and z is not None:
            logit = logit + mm("tkr,tr->tk", user_router[idc], z).float()
        keep = torch.zeros(T, K, dtype=torch.bool)
        keep.scatter_(1, logit.topk(K if top_k is None else top_k, dim=1).indices, True)
        g = torch.softmax(logit.masked_fill(~keep, float("-inf")), dim=1).to(dtype)
        for k in range(K):
            y = y + expert_scale * g[:, k:k + 1] * mm("tr,or->to", mm("td,rd->tr", x, expert_A[k]), expert_B[k])
    if z is not None:
        y = y + user_scale * mm("tor,tr->to", user_B[idc], z) * has
    return y


def call_decode(fn, x, weight, bias, **kw):
    """``fn(x, weight, bias, adapters, **rest)`` for keyword-form arguments ``kw`` (the
    adapter tensors, scales and top_k of ``proper_kernels.lora_mixture``, gathered
    into an Adapters, and the rest: user_ids, plan, out, launch, ...). ``fn`` is a
    function of proper_kernels.ops.cuda_decode (check_decode_args, unsupported_reason,
    lora_mixture_decode_cuda, run_extension with its module bound) or the reference
    lora_mixture_ref: the one place the tests adapt to their signatures."""
    from proper_kernels.reference.adapters import Adapters

    adapters = Adapters.from_kwargs(kw)
    rest = {k: v for k, v in kw.items() if k not in Adapters._fields}
    return fn(x, weight, bias, adapters, **rest)


class DecodeRunner:
    """Runs the decode kernel in launch mode ``launch`` ("two", "one", or None: the
    default choice) under no_grad (unless ``no_grad=False``): through the emulation
    module ``ext`` on CPU tensors, or (``ext`` None) through the built extension on the
    GPU, waiting for it. ``name`` is the test id."""

    def __init__(self, name: str, launch: Optional[str], ext=None, *, no_grad: bool = True):
        self.name, self.launch, self.ext, self.no_grad = name, launch, ext, no_grad
        self.device = "cpu" if ext is not None else "cuda"

    @classmethod
    def emulated(cls, ext, launch: str) -> "DecodeRunner":
        """On an emulated sm_90 with 132 SMs (the PDL path for "two"); the single launch
        on 4 SMs: a grid of at most 8 co-resident blocks, so that blocks loop over
        several tiles of each phase. Clears the launch log."""
        ext.configure(sms=4 if launch == "one" else 132)
        ext.launches(clear=True)
        return cls("emulated" + ("-one" if launch == "one" else ""), launch, ext)

    def __call__(self, x, weight, bias, **kw):
        import functools

        from proper_kernels.ops import cuda_decode

        fn = (cuda_decode.lora_mixture_decode_cuda if self.ext is None
              else functools.partial(cuda_decode.run_extension, self.ext))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.no_grad):
            res = call_decode(fn, x, weight, bias, launch=self.launch, **kw)
        if self.ext is None:
            torch.cuda.synchronize()
        return res


def assert_decode_close(y, x, weight, bias, kw, name: str = ""):
    """Decode output y under the one tolerance rule (:func:`assert_close`): the exact
    oracle is decode_loop_ref in fp64; the baseline is the plain computation of x's
    precision (decode_loop_ref in fp32 for fp32 x, decode_batched_ref in x's dtype for
    fp16 / bf16, what torch on a GPU computes). Returns the fp32 oracle's gates."""
    cpu = lambda t: t.cpu() if torch.is_tensor(t) else t  # noqa: E731
    args = (cpu(x), cpu(weight), cpu(bias))
    kw = {k: cpu(v) for k, v in kw.items()}
    y_ref, _ = decode_loop_ref(*args, dtype=torch.float64, **kw)
    y_f32, g_ref = decode_loop_ref(*args, dtype=torch.float32, **kw)
    baseline = y_f32 if x.dtype == torch.float32 else decode_batched_ref(*args, dtype=x.dtype, **kw)
    assert torch.isfinite(y).all(), f"{name}: non-finite output"
    assert_close(f"{name} y", y.cpu(), y_ref, baseline)
    return g_ref
