import pytest
import torch

from seqmix.ops._checks import check_sign


@pytest.mark.parametrize("sign, bad", [(-1, 0.5), (1, -0.5)])
def test_check_sign_rejects_the_wrong_sign(sign, bad):
    t = sign * torch.rand(3, 4, dtype=torch.float64)
    check_sign(t, sign, "t must keep its sign")
    t[1, 2] = bad
    with pytest.raises(ValueError, match="t must keep its sign; got (max|min) "):
        check_sign(t, sign, "t must keep its sign")


def test_check_sign_accepts_zero_empty_and_nan():
    check_sign(torch.zeros(2, 3), -1, "never raised")
    check_sign(torch.zeros(2, 3), 1, "never raised")
    check_sign(torch.empty(0, 3), -1, "never raised")
    check_sign(torch.tensor([-1.0, float("nan")]), -1, "never raised")  # a diverged model's NaN passes
