"""Loading weights in place and checking many updates' values at once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oiafed.core import validation
from oiafed.core.validation import distances, nonfinite_problems, value_problems
from oiafed.core.weights import load_weights


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))


def random_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point()
                else v + 7) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", [bn_net, lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU())])
def test_load_weights_equals_load_state_dict_and_keeps_the_parameters(make):
    fast, reference = make(), make()
    weights = random_weights(fast, seed=1)
    params = [id(p) for p in fast.parameters()]
    load_weights(fast, weights)
    reference.load_state_dict(weights)
    assert [id(p) for p in fast.parameters()] == params  # copied in place
    for key, value in reference.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key
    assert not any(p.grad_fn for p in fast.parameters())


def test_load_weights_rejects_what_load_state_dict_rejects():
    model = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(model, {"weight": torch.zeros(1, 3), "bias": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing key"):
        load_weights(model, {"weight": torch.zeros(2, 3)})


def test_load_weights_honours_a_module_that_customises_loading():
    model = nn.Linear(3, 2)
    seen = []
    model.register_load_state_dict_pre_hook(lambda *args, **kwargs: seen.append("hook"))
    load_weights(model, {"weight": torch.ones(2, 3), "bias": torch.ones(2)})
    assert seen == ["hook"] and torch.equal(model.weight, torch.ones(2, 3))


def test_nonfinite_problems_names_the_bad_tensor_of_each_bad_update():
    good = {"w": torch.ones(2, 2), "b": torch.zeros(2), "steps": torch.tensor(3)}
    nan = {**good, "b": torch.tensor([0.0, float("nan")])}
    inf = {**good, "w": torch.tensor([[1.0, float("-inf")], [0.0, 0.0]])}
    assert nonfinite_problems([good, good]) == [None, None]
    assert nonfinite_problems([good, nan, inf]) == [
        None, "b holds non-finite values", "w holds non-finite values"]
    assert nonfinite_problems([]) == []


def test_nonfinite_problems_does_not_mistake_a_sum_overflow_for_a_bad_value():
    huge = {"w": torch.full((4,), 1e308, dtype=torch.float64)}  # finite; the sum is not
    assert nonfinite_problems([huge, huge]) == [None, None]


@pytest.mark.parametrize("stack", [validation.STACK_VALUES, 200, 0])  # all, some or no names
def test_update_distances_equal_a_float64_computation(monkeypatch, stack):
    monkeypatch.setattr(validation, "STACK_VALUES", stack)
    gen = torch.Generator().manual_seed(0)
    reference = {"w": torch.randn(50, 40, generator=gen), "b": torch.randn(40, generator=gen),
                 "h": torch.randn(30, generator=gen).to(torch.bfloat16), "steps": torch.tensor(3)}
    updates = [{k: (v + 0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype)
                if v.is_floating_point() else v + 1 for k, v in reference.items()}
               for _ in range(3)]
    expected = [math.sqrt(sum(((u[k].double() - reference[k].double()) ** 2).sum().item()
                              for k in ("w", "b", "h"))) for u in updates]
    assert distances(updates, reference) == pytest.approx(expected, rel=1e-6)
    assert distances(updates, reference, exact=True) == pytest.approx(expected, rel=1e-12)
    assert distances([{"steps": torch.tensor(4)}], {"steps": torch.tensor(3)}) == [0.0]


def test_a_distance_beyond_float32_is_measured_exactly_not_taken_for_a_non_finite_value():
    reference = {"w": torch.zeros(8)}
    near = [{"w": torch.full((8,), 0.01 * (i + 1))} for i in range(3)]
    far = {"w": torch.full((8,), 3e38)}  # finite; its squared norm overflows float32
    problems = value_problems([*near, far], reference, ratio=10.0)
    assert problems[:3] == [None, None, None]
    assert problems[3] is not None and problems[3].startswith("it is 8.49e+38 from the global")
