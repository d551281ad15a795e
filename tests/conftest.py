"""Suite-wide guards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_global_grad_mode_leak():
    """Fail the test that leaves autograd switched off: later tests would silently lose their gradients."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left torch's global grad mode disabled (use a no_grad context or decorator)"
