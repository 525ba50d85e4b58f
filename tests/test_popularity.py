"""proper_kernels.testing's popularity laws (which user each token of a batch belongs
to: Punica's four workloads and our random draws) and its random mixture inputs, on
which the benchmark and the kernel tests run."""
import pytest
import torch

from proper_kernels.testing import POPULARITY_LAWS, make_mixture_inputs, sample_user_ids


@pytest.mark.parametrize("law", POPULARITY_LAWS)
@pytest.mark.parametrize("T,N", [(1, 1), (19, 4), (99, 16), (989, 64)])
def test_sampler_range_dtype_reproducible(law, T, N):
    ids = sample_user_ids(T, N, law, generator=torch.Generator().manual_seed(3))
    assert ids.dtype == torch.int64 and ids.shape == (T,)
    assert int(ids.min()) >= 0 and int(ids.max()) < N
    again = sample_user_ids(T, N, law, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ids, again)


def test_sampler_laws_shape_the_batch():
    g = torch.Generator().manual_seed(0)
    d = sample_user_ids(10, 4, "distinct", generator=g)
    assert d.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert sample_user_ids(8, 64, "distinct").unique().numel() == 8
    ident = sample_user_ids(50, 16, "identical", generator=g)
    assert ident.unique().numel() == 1
    sk = sample_user_ids(1001, 64, "skewed", generator=g)
    hot_count = sk.bincount().max().item()
    assert hot_count >= 501  # half of the tokens (rounded up) are one user, plus its uniform share
    z = sample_user_ids(20000, 64, "zipf", generator=g)
    counts = z.bincount(minlength=64).sort(descending=True).values.double()
    # Zipf(1.5): the top user holds 1/zeta_64(1.5) ~ 43% of the draws, rank 2 about 2^-1.5 of that.
    assert 0.38 < counts[0] / 20000 < 0.48
    assert 0.28 < counts[1] / counts[0] < 0.43
    u = sample_user_ids(20000, 8, "uniform", generator=g).bincount(minlength=8).double()
    assert (u / 20000 - 1 / 8).abs().max() < 0.02
    assert sample_user_ids(0, 5, "zipf").numel() == 0


def test_sampler_rejects_bad_law():
    with pytest.raises(ValueError, match="valid laws: distinct, uniform, zipf, identical, skewed"):
        sample_user_ids(4, 2, "pareto")


def test_make_mixture_inputs_runs_through_reference():
    from proper_kernels import lora_mixture

    inp = make_mixture_inputs(19, 24, 40, K=3, r=4, r_u=4, N=5, law="zipf")
    y = lora_mixture(**inp, backend="reference")
    assert y.shape == (19, 40) and torch.isfinite(y).all()


def test_punica_laws_are_punicas_segments():
    """punica-uniform / punica-skewed are Punica's Uniform and Skewed workloads:
    contiguous segments of ceil(sqrt T) equal shares, and of floor(1.5^k) tokens
    (the remainder last), longest first, one distinct user each."""
    from proper_kernels.testing import punica_segments
    assert punica_segments(64, "punica-uniform") == [8] * 8
    assert punica_segments(7, "punica-uniform") == [3, 2, 2]
    assert punica_segments(64, "punica-skewed") == [17, 17, 11, 7, 5, 3, 2, 1, 1]
    assert punica_segments(1, "punica-skewed") == [1] and punica_segments(0, "punica-uniform") == []
    for T in (1, 2, 5, 16, 63, 64, 256, 1000):
        for law in ("punica-uniform", "punica-skewed"):
            lens = punica_segments(T, law)
            assert sum(lens) == T and min(lens) >= 1 and lens == sorted(lens, reverse=True)
    g = torch.Generator().manual_seed(3)
    ids = sample_user_ids(64, 64, "punica-skewed", generator=g)
    runs = torch.unique_consecutive(ids, return_counts=True)
    assert runs[1].tolist() == punica_segments(64, "punica-skewed")
    assert runs[0].unique().numel() == 9  # one user per segment
    ids = sample_user_ids(10, 2, "punica-uniform", generator=g)  # 4 segments, 2 users: reused
    assert ids.unique().numel() == 2 and torch.unique_consecutive(ids).numel() == 4
    with pytest.raises(ValueError, match="segment law"):
        punica_segments(8, "uniform")
