"""The CUDA decode path as a torch custom op (``proper_kernels::mixture_decode``).

On CPU the op runs the emulation build of csrc/ (``cuda_decode.use_extension``);
on a GPU the real extension. Checks: torch.library.opcheck (schema, fake, dynamic
shapes), torch.compile(fullgraph=True) through the public decode function, and the
same result as the eager call and the reference.
"""
import pytest
import torch

import proper_kernels as pk
from proper_kernels.ops import cuda_decode
from proper_kernels.testing import assert_close, load_emulator, make_mixture_inputs


@pytest.fixture(scope="module")
def ext():
    """The extension the op runs: the real one on a GPU machine, else the emulation."""
    if torch.cuda.is_available() and cuda_decode.available():
        return None
    return load_emulator()


def _case(ext, T=7, N=5, **kw):
    device = "cpu" if ext is not None else "cuda"
    inp = make_mixture_inputs(T, 32, 24, K=3, r=4, r_u=4, N=N, device=device, **kw)
    return inp["x"], inp["weight"], inp["bias"], pk.Adapters.from_kwargs(inp), inp["user_ids"]


def _context(ext):
    return cuda_decode.use_extension(ext) if ext is not None else torch.no_grad()


@pytest.mark.parametrize("return_gates", [True, False])
def test_opcheck(ext, return_gates):
    x, W, b, ad, ids = _case(ext)
    args = (x, W, b, *ad.tensors(), ids.to(torch.int32), 2.0, 2.0, 0, W.shape[0], "two", return_gates)
    with _context(ext):
        result = torch.library.opcheck(cuda_decode.mixture_decode_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_fullgraph_matches_eager_and_reference(ext):
    x, W, b, ad, ids = _case(ext, T=5)
    plan = pk.plan(ids, ad.num_users)

    def decode(x, plan):
        return cuda_decode.lora_mixture_decode_cuda(x, W, b, ad, plan=plan, return_gates=True)

    with torch.no_grad(), _context(ext):
        y0, g0 = decode(x, plan)
        y1, g1 = torch.compile(decode, fullgraph=True)(x, plan)
    ad64 = ad.to(torch.float64)
    ref, gref = pk.lora_mixture_ref(x.double(), W.double(), b.double(), ad64, ids)
    base, _ = pk.lora_mixture_ref(x, W, b, ad, ids)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert_close("y", y1, ref, base)
    assert_close("gates", g1, gref, g1.double())


def test_compiled_decode_rejects_a_stale_plan(ext):
    x, W, b, ad, ids = _case(ext)
    plan = pk.plan(ids, ad.num_users)
    other = (ids + 1) % ad.num_users

    def decode(x, ids, plan):
        return cuda_decode.lora_mixture_decode_cuda(x, W, b, ad, user_ids=ids, plan=plan)

    with torch.no_grad(), _context(ext):
        compiled = torch.compile(decode, fullgraph=True)
        compiled(x, ids, plan)
        with pytest.raises(RuntimeError, match="differ from the ids the plan was built from"):
            compiled(x, other, plan)
            if x.is_cuda:
                torch.cuda.synchronize()
