"""The auxiliary losses of the group stage (proper_kernels/reference/losses.py)."""
import pytest
import torch

from proper_kernels.reference import balance_loss, diversity_loss


def test_balance_loss():
    K = 4
    assert balance_loss(torch.full((10, K), 1.0 / K)).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.zeros(10, K)
    collapsed[:, 0] = 1
    # importance = [10, 0, 0, 0]: var = 18.75, mean^2 = 6.25 -> cv^2 = 3 = K - 1
    assert balance_loss(collapsed).item() == pytest.approx(K - 1)
    mask = torch.zeros(10, dtype=torch.bool)
    assert balance_loss(collapsed, mask).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        balance_loss(collapsed, torch.ones(3, dtype=torch.bool))


def test_diversity_loss():
    eye = torch.eye(8)
    orth = torch.stack([eye[0:2], eye[2:4], eye[4:6]])  # orthogonal row spaces
    assert diversity_loss(orth).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.stack([eye[0:1]] * 3)
    assert diversity_loss(same).item() == pytest.approx(1.0)
    A = torch.randn(3, 2, 8, requires_grad=True)
    diversity_loss(A).backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()
    assert diversity_loss(torch.randn(1, 2, 8)).item() == 0.0


def test_aux_losses_keep_float64_for_gradcheck():
    g = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1).requires_grad_()
    assert balance_loss(g).dtype == torch.float64
    assert torch.autograd.gradcheck(balance_loss, (g,))
    A = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert diversity_loss(A, B).dtype == torch.float64
    assert torch.autograd.gradcheck(diversity_loss, (A, B))
    assert balance_loss(g.detach().half()).dtype == torch.float32  # low precision still sums in fp32
