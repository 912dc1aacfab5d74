"""The delay simulator (mpisgd.downpour.delay_simulator) against plain torch loops written here, bitwise: tau = 0 is
sequential SGD, tau > 0 applies each gradient exactly tau updates late, DC-ASGD's correction is Zheng et
al.'s formula."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpisgd.downpour.delay_simulator import simulate
from mpisgd.errors import ConfigError
from mpisgd.models import build_model

LR, WD, LAMBDA = 0.1, 1e-4, 0.5


def batches(count, seed=3):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=generator) * 2
    out = []
    for _ in range(count):
        y = torch.randint(0, 3, (8,), generator=generator)
        out.append((centers[y] + torch.randn(8, 6, generator=generator), y))
    return out


def model():
    return build_model("mlp", (6,), 3, (16,), seed=7)


def gradient_at(net, w, x, y):
    """Plain torch: the loss gradient at parameters ``w`` (a flat tensor), plus weight decay."""
    torch.nn.utils.vector_to_parameters(w.clone(), net.parameters())
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]) + WD * w


def delayed_sgd(data, tau, dc=False):
    """The reference: gradient k is computed at w_k and applied at update k + tau (then drained)."""
    net = model()
    w = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
    queue = []
    for x, y in data:
        queue.append((gradient_at(net, w, x, y), w.clone()))
        if len(queue) > tau:
            g, w_old = queue.pop(0)
            if dc:
                g = g + LAMBDA * g * g * (w - w_old)
            w = w - LR * g
    for g, w_old in queue:
        if dc:
            g = g + LAMBDA * g * g * (w - w_old)
        w = w - LR * g
    return w.numpy()


def run(data, tau, method="asgd"):
    w, _ = simulate(model(), iter(data), updates=len(data), tau=tau, method=method, lr=LR, weight_decay=WD,
                    dc_lambda=LAMBDA)
    return w


def test_tau_0_is_sequential_sgd():
    data = batches(40)
    np.testing.assert_array_equal(run(data, 0), delayed_sgd(data, 0))


@pytest.mark.parametrize("tau", [1, 4])
def test_each_gradient_is_applied_exactly_tau_updates_late(tau):
    data = batches(40)
    np.testing.assert_array_equal(run(data, tau), delayed_sgd(data, tau))
    assert np.abs(run(data, tau) - delayed_sgd(data, 0)).max() > 1e-4  # the delay changes the result


def test_constant_dcasgd_applies_zheng_et_al_correction():
    data = batches(40)
    np.testing.assert_array_equal(run(data, 4, "dcasgd-constant"), delayed_sgd(data, 4, dc=True))
    assert np.abs(run(data, 4, "dcasgd-constant") - run(data, 4)).max() > 1e-6


def test_dcasgd_at_tau_0_is_sgd():
    """No delay, nothing to compensate: w_now == w_pulled."""
    data = batches(20)
    np.testing.assert_array_equal(run(data, 0, "dcasgd-adaptive"), delayed_sgd(data, 0))


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="method"):
        simulate(model(), iter(batches(2)), updates=2, tau=0, method="hogwild")
    with pytest.raises(ConfigError, match="tau"):
        simulate(model(), iter(batches(2)), updates=2, tau=-1)
