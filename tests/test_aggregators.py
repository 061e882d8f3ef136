"""Aggregation maths against an independent NumPy calculation (STYLE 10/11).

Every client sends different values, with a different weight, in odd shapes: a test where
every client sends the same array passes for any weighting, so it would prove nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from oiafed import registry
from oiafed.core.aggregators import FedAvg, weighted_average
from oiafed.core.types import ClientUpdate
from oiafed.exceptions import OiafedError

SHAPES = {"conv.weight": (3, 1, 5, 2), "fc.weight": (7, 3), "fc.bias": (7,), "scale": ()}


def client_weights(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {k: (torch.randn(shape, generator=gen) * (seed + 1)).to(dtype) for k, shape in SHAPES.items()}
    weights["bn.num_batches_tracked"] = torch.tensor(10 * seed + 3, dtype=torch.int64)
    return weights


def numpy_average(weights_list, coefficients) -> dict[str, np.ndarray]:
    """The weighted mean computed independently: sum(c_i * x_i) / sum(c_i), in float64."""
    c = np.asarray(coefficients, dtype=np.float64)
    out = {}
    for key in SHAPES:
        arrays = [w[key].double().numpy() for w in weights_list]
        out[key] = sum(ci * a for ci, a in zip(c, arrays, strict=True)) / c.sum()
    return out


def updates(counts: list[int]) -> list[ClientUpdate]:
    return [ClientUpdate(f"client_{i}", n, {}, client_weights(i)) for i, n in enumerate(counts)]


@pytest.mark.parametrize("coefficients", [[1.0, 3.0, 6.5], [120, 7, 1, 33], [0.2, 0.0]])
def test_weighted_average_matches_numpy(coefficients: list[float]) -> None:
    weights_list = [client_weights(i) for i in range(len(coefficients))]
    result = weighted_average(weights_list, coefficients)
    expected = numpy_average(weights_list, coefficients)
    assert set(result) == set(weights_list[0])
    for key, value in expected.items():
        assert result[key].shape == SHAPES[key]
        assert result[key].dtype == torch.float32
        np.testing.assert_allclose(result[key].numpy(), value, rtol=1e-6, atol=1e-6)


def test_weighted_average_is_not_the_plain_mean() -> None:
    # Guards the test above: with these inputs, the weighting changes the answer.
    weights_list = [client_weights(i) for i in range(3)]
    weighted = weighted_average(weights_list, [1.0, 3.0, 6.5])
    plain = numpy_average(weights_list, [1, 1, 1])
    assert not np.allclose(weighted["fc.weight"].numpy(), plain["fc.weight"])


def test_float64_inputs_are_averaged_exactly_and_keep_their_dtype() -> None:
    weights_list = [client_weights(i, torch.float64) for i in range(3)]
    result = weighted_average(weights_list, [2, 5, 11])
    for key, value in numpy_average(weights_list, [2, 5, 11]).items():
        assert result[key].dtype == torch.float64
        np.testing.assert_allclose(result[key].numpy(), value, rtol=1e-12)


def test_half_precision_keeps_its_dtype() -> None:
    a = {"w": torch.full((4,), 1000.0, dtype=torch.float16)}
    b = {"w": torch.full((4,), 1004.0, dtype=torch.float16)}
    result = weighted_average([a, b], [3, 1])
    assert result["w"].dtype == torch.float16
    assert result["w"].tolist() == [1001.0] * 4


def test_integer_buffers_come_from_the_heaviest_update() -> None:
    weights_list = [client_weights(i) for i in range(3)]
    result = weighted_average(weights_list, [5, 40, 2])
    counter = result["bn.num_batches_tracked"]
    assert counter.dtype == torch.int64
    assert counter.item() == 13  # client 1's value (10 * 1 + 3), not an average
    assert weighted_average(weights_list, [5, 2, 40])["bn.num_batches_tracked"].item() == 23


def test_bool_buffers_are_not_averaged() -> None:
    a = {"mask": torch.tensor([True, False, True])}
    b = {"mask": torch.tensor([False, False, True])}
    assert weighted_average([a, b], [1, 9])["mask"].tolist() == [False, False, True]


def test_one_update_is_returned_as_a_copy() -> None:
    only = client_weights(4)
    result = weighted_average([only], [17])
    for key, value in only.items():
        assert torch.equal(result[key], value)
        assert result[key].data_ptr() != value.data_ptr()


def test_inputs_are_not_mutated_and_the_result_shares_no_memory() -> None:
    weights_list = [client_weights(i) for i in range(3)]
    coefficients = [1, 2, 3]
    before = copy.deepcopy(weights_list)
    result = weighted_average(weights_list, coefficients)
    assert coefficients == [1, 2, 3]
    for key in result:
        result[key].add_(100)  # changing the result must not reach any input
    for original, now in zip(before, weights_list, strict=True):
        assert original.keys() == now.keys()
        for key in original:
            assert torch.equal(original[key], now[key])


@pytest.mark.parametrize(("coefficients", "message"), [
    ([0, 0, 0], "sum to zero"),
    ([0.0, -1.0, 1.0], "non-negative"),
    ([1.0, float("nan"), 1.0], "finite"),
    ([1.0, float("inf"), 1.0], "finite"),
    ([1.0, 2.0], "3 updates but 2 coefficients"),
])
def test_bad_coefficients_raise(coefficients: list[float], message: str) -> None:
    with pytest.raises(OiafedError, match=message):
        weighted_average([client_weights(i) for i in range(3)], coefficients)


def test_empty_list_raises() -> None:
    with pytest.raises(OiafedError, match="zero updates"):
        weighted_average([], [])


def test_mismatched_keys_or_shapes_raise() -> None:
    a, b = client_weights(0), client_weights(1)
    del b["fc.bias"]
    with pytest.raises(OiafedError, match="update 1 has keys"):
        weighted_average([a, b], [1, 1])
    c = client_weights(2)
    c["fc.weight"] = torch.zeros(3, 7)
    with pytest.raises(OiafedError, match=r"'fc.weight' of shape \(3, 7\) instead of \(7, 3\)"):
        weighted_average([client_weights(0), c], [1, 1])


# -- FedAvg -------------------------------------------------------------------------------------


def test_fedavg_weights_by_num_samples() -> None:
    ups = updates([10, 250, 41])
    result = FedAvg().aggregate(ups, global_weights=client_weights(99))
    expected = numpy_average([u.weights for u in ups], [10, 250, 41])
    for key, value in expected.items():
        np.testing.assert_allclose(result[key].numpy(), value, rtol=1e-6, atol=1e-6)


def test_fedavg_unweighted_takes_the_plain_mean() -> None:
    ups = updates([10, 250, 41])
    aggregator = registry.build("aggregator", {"type": "fedavg", "args": {"weighted": False}})
    assert isinstance(aggregator, FedAvg) and aggregator.weighted is False
    result = aggregator.aggregate(ups, global_weights=client_weights(99))
    expected = numpy_average([u.weights for u in ups], [1, 1, 1])
    for key, value in expected.items():
        np.testing.assert_allclose(result[key].numpy(), value, rtol=1e-6, atol=1e-6)
    weighted = FedAvg(weighted=True).aggregate(ups, global_weights=client_weights(99))
    assert not torch.allclose(weighted["fc.weight"], result["fc.weight"])


def test_fedavg_with_no_samples_or_no_updates_raises() -> None:
    with pytest.raises(OiafedError, match="sum to zero"):
        FedAvg().aggregate(updates([0, 0]), global_weights=client_weights(9))
    with pytest.raises(OiafedError, match="zero updates"):
        FedAvg().aggregate([], global_weights=client_weights(9))
    # Unweighted, clients without samples still count.
    FedAvg(weighted=False).aggregate(updates([0, 0]), global_weights=client_weights(9))


def test_fedavg_is_stateless_and_registered() -> None:
    assert registry.get("aggregator", "fedavg") is FedAvg
    assert FedAvg().state_dict() == {}
