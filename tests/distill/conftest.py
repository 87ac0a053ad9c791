import pytest
import torch

MASK_SHAPE = (3, 7)  # batch, sequence: the shapes test_losses.py and test_fused_kd.py use


@pytest.fixture
def kd_masks():
    """(trace mask, answer mask) [3, 7]: a random trace, one sequence without any, and the
    answer at the second-to-last position (never also a trace token)."""
    b, s = MASK_SHAPE
    g = torch.Generator().manual_seed(5)
    trace = (torch.rand(b, s, generator=g) > 0.4).float()
    trace[2] = 0.0  # a sequence without any trace token
    answer = torch.zeros(b, s)
    answer[:, -2] = 1.0
    trace[:, -2] = 0.0
    return trace, answer
