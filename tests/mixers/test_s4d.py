import pytest
import torch

import seqmix
from tests.helpers import rel_err


@pytest.mark.parametrize("length", [1, 2, 7, 64, 257])
@pytest.mark.parametrize("direction", [0, 1])
def test_kernel_equals_every_power(length, direction):
    """The blocked kernel (lags split as a L_b + r) equals K_l = 2 Re(sum_n C_n B_n exp(l dt A_n)) from every power."""
    mixer = seqmix.build_mixer("s4d", 6, n_heads=1, d_state=8).double()
    dtA, B = mixer._discrete()
    powers = torch.exp(dtA[..., None] * torch.arange(length))
    expected = 2 * torch.einsum("dn,dnl->dl", mixer._C(direction) * B, powers).real
    assert mixer.kernel(length, direction).shape == (6, length)
    assert rel_err(mixer.kernel(length, direction), expected) < 1e-12
