"""sync-ps's server rule (MomentumRule) against torch.optim.SGD with momentum, chunk by chunk as a shard
applies it."""

import numpy as np
import pytest
import torch

from mpisgd.downpour.rules import make_rule
from mpisgd.errors import ConfigError


def test_momentum_rule_takes_torch_sgd_steps():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(10).astype(np.float32)
    grads = [rng.standard_normal(10).astype(np.float32) for _ in range(5)]
    rule = make_rule("momentum", 10, lr=0.05, momentum=0.9)
    ours = w0.copy()
    for g in grads:
        for start in (0, 4):  # two chunks, as a server applies its shard
            where = slice(start, start + 4 if start == 0 else 10)
            rule.apply(ours[where], g[where].copy(), where)
    theirs = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    optimizer = torch.optim.SGD([theirs], lr=0.05, momentum=0.9)
    for g in grads:
        theirs.grad = torch.from_numpy(g.copy())
        optimizer.step()
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_momentum_must_be_below_one():
    with pytest.raises(ConfigError, match="momentum"):
        make_rule("momentum", 3, lr=0.1, momentum=1.0)
