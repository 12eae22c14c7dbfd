"""kp_ros/core/in_place_activation.py: ReLU and LeakyReLU overwrite their input, anything
else runs as the module; the values are the module's either way."""
from __future__ import annotations

import pytest
import torch

from kp_ros.core.in_place_activation import activate_in_place


@pytest.mark.parametrize("activation, in_place", [(torch.nn.ReLU(), True), (torch.nn.LeakyReLU(0.2), True),
                                                  (torch.nn.GELU(), False), (torch.nn.Tanh(), False)])
def test_values_are_the_modules(activation, in_place):
    states = torch.linspace(-3, 3, 61).reshape(1, 1, 61)
    expected = activation(states.clone())
    got = activate_in_place(activation, states)
    assert torch.equal(got, expected)
    assert (got.data_ptr() == states.data_ptr()) is in_place
