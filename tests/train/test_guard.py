"""The check before every save: weights with one non-finite value are never written."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from kdscale.train.guard import NonFiniteError, check_weights_finite


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_finite_weights_pass(accelerator):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check_weights_finite(accelerator, model, "the student")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("layer", [0, 1])
def test_one_non_finite_value_anywhere_stops_the_save(accelerator, value, layer):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[layer].bias[-1] = value
    with pytest.raises(NonFiniteError) as raised:
        check_weights_finite(accelerator, model, "the checkpoint of step 3")
    assert str(raised.value) == ("the weights are not finite; the checkpoint of step 3 is not "
                                 "written and the previous one, if any, is kept")
