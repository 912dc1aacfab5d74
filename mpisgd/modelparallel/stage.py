"""Running one stage's share of a step: its schedule's actions over its micro-batches.

:class:`StageWorker` knows the local sub-module and what it must keep between a micro-batch's forward and
its backward; the schedule says in which order, the :class:`~mpisgd.modelparallel.transport.PipelineLink`
moves the tensors. Every micro-batch's loss is divided by M, so the gradients summed over the micro-batches
are those of the mean loss over the whole (replica's) batch, as one unsplit step would compute.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mpisgd.modelparallel.schedules import Action, ActionKind
from mpisgd.modelparallel.transport import PipelineLink

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


class _LinearDeferringWeightGradient(torch.autograd.Function):
    """``F.linear`` whose backward returns only the input's gradient (the next stage back waits for it) and
    keeps (input, output gradient) for :class:`WeightGradients` to turn into the weight's gradient later."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                kept: list) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kept = kept
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        ctx.kept.append((x.detach(), grad.detach()))
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _deferring_forward(linear: nn.Linear, kept: list, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return F.linear(x, linear.weight, linear.bias)
    return _LinearDeferringWeightGradient.apply(x, linear.weight, linear.bias, kept)


class WeightGradients:
    """Weight gradients of a stage's Linears in one GEMM per layer per step, instead of one per micro-batch.

    Measured cause (``benchmarks/model_parallel.py``, K=2, M=8): with micro-batches every Linear computed
    its weight gradient M times on M-times smaller blocks (rows/M, a slower GEMM) and added each to
    ``.grad`` (a read and write of the whole weight per micro-batch). Deferred, the step computes
    ``G^T X`` once over all micro-batches' rows: the same sum, fewer passes over the weights. Only the
    input gradients, which the previous stage waits for, are computed in the schedule's backward actions.
    """

    def __init__(self, module: nn.Module) -> None:
        self.linears = [m for m in module.modules() if type(m) is nn.Linear and m.weight.requires_grad]
        self.kept: dict[int, list] = {id(m): [] for m in self.linears}
        # the blocks of each layer's (input, output gradient), joined: kept from step to step, since fresh
        # multi-MiB tensors every step cost page faults (a quarter of the join's time, measured)
        self._joined: dict[tuple, torch.Tensor] = {}

    def enable(self) -> None:
        """Route the Linears' forward through the deferring function (an instance attribute: names unchanged)."""
        for m in self.linears:
            m.forward = functools.partial(_deferring_forward, m, self.kept[id(m)])  # type: ignore[method-assign]

    def disable(self) -> None:
        """Back to the Linears' own forward (outside a step the user's layers behave as ever)."""
        for m in self.linears:
            m.__dict__.pop("forward", None)

    def accumulate(self) -> None:
        """Add the kept blocks' weight (and bias) gradients to ``.grad``; forget the blocks."""
        for m in self.linears:
            kept = self.kept[id(m)]
            if not kept:
                continue
            x = self._join(m, 0, [k[0].reshape(-1, m.in_features) for k in kept])
            grad = self._join(m, 1, [k[1].reshape(-1, m.out_features) for k in kept])
            kept.clear()
            if m.weight.grad is None:
                m.weight.grad = grad.t() @ x
            else:
                m.weight.grad.addmm_(grad.t(), x)
            if m.bias is not None and m.bias.requires_grad:
                bias_grad = grad.sum(dim=0)
                m.bias.grad = bias_grad if m.bias.grad is None else m.bias.grad.add_(bias_grad)

    def _join(self, m: nn.Linear, which: int, blocks: list) -> torch.Tensor:
        """The blocks stacked by rows, into this layer's buffer of that shape (made on first use)."""
        rows = sum(len(b) for b in blocks)
        key = (id(m), which)
        buffer = self._joined.get(key)
        if buffer is None or buffer.shape[0] != rows or buffer.dtype != blocks[0].dtype \
                or buffer.device != blocks[0].device:
            buffer = self._joined[key] = torch.empty(rows, blocks[0].shape[1], dtype=blocks[0].dtype,
                                                     device=blocks[0].device)
        return torch.cat(blocks, out=buffer)

    def abandon(self) -> None:
        for kept in self.kept.values():
            kept.clear()


class StageWorker:
    """Forward and backward of micro-batches through ``module``, the local stage.

    Args:
        module: this rank's layers.
        link: its boundaries to the neighbouring stages.
    """

    def __init__(self, module: nn.Module, link: PipelineLink) -> None:
        self.module, self.link = module, link
        # activations travel through host memory; the stage computes where its tensors live
        tensors = [*module.parameters(), *module.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.current: Optional[Action] = None  # for error messages: what was running
        self.most_held = 0  # the most micro-batches whose activations this stage kept at once (1F1B: <= K-s)
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.weight_gradients = WeightGradients(module)

    def run(self, actions: Sequence[Action], inputs: Optional[Sequence[torch.Tensor]],
            targets: Optional[Sequence[Any]], loss_fn: Optional[LossFn]) -> Optional[float]:
        """Run ``actions``; returns the sum of the scaled micro-batch losses on the last stage, else None.

        ``inputs``: the micro-batches of x (first stage only); ``targets``: those of y (last stage only).
        """
        micro_batches = sum(1 for action in actions if action.kind is ActionKind.FORWARD)
        total = None
        self.weight_gradients.enable()
        try:
            for action in actions:
                self.current = action
                if action.kind is ActionKind.FORWARD:
                    loss = self._forward(action.micro_batch, inputs, targets, loss_fn, micro_batches)
                    if loss is not None:
                        total = loss if total is None else total + loss
                else:
                    self._backward(action.micro_batch)
        finally:
            self.weight_gradients.disable()
        self.current = None
        self.weight_gradients.accumulate()
        return total

    def forward_only(self, inputs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """One micro-batch forward without gradients (evaluation): the output on the last stage, else None."""
        self.current = Action(ActionKind.FORWARD, 0)
        with torch.no_grad():
            activation = inputs if self.link.first else self.link.receive_activation(0)
            assert activation is not None
            output = self.module(activation.to(self.device))
            if not self.link.last:
                self.link.send_activation(0, output)
        self.current = None
        return output if self.link.last else None

    def _forward(self, micro_batch: int, inputs: Optional[Sequence[torch.Tensor]],
                 targets: Optional[Sequence[Any]], loss_fn: Optional[LossFn], micro_batches: int) -> Optional[float]:
        if self.link.first:
            assert inputs is not None
            activation = inputs[micro_batch].to(self.device)
        else:
            received = self.link.receive_activation(micro_batch)
            assert self.link.inbound is not None
            activation = received.to(self.device).detach().requires_grad_(self.link.inbound.requires_grad)
        output = self.module(activation)
        self._inputs[micro_batch] = activation
        self.most_held = max(self.most_held, len(self._inputs))
        if not self.link.last:
            self.link.send_activation(micro_batch, output)
            self._outputs[micro_batch] = output
            return None
        assert targets is not None and loss_fn is not None
        target = targets[micro_batch]
        loss = loss_fn(output, target.to(output.device) if torch.is_tensor(target) else target) / micro_batches
        self._outputs[micro_batch] = loss
        return float(loss.detach())

    def _backward(self, micro_batch: int) -> None:
        output = self._outputs.pop(micro_batch)
        activation = self._inputs.pop(micro_batch)
        if self.link.last:
            if output.requires_grad:
                output.backward()
        elif self.link.outbound is not None and self.link.outbound.requires_grad:
            torch.autograd.backward(output, self.link.receive_gradient(micro_batch).to(output.device))
        if not self.link.first and self.link.inbound is not None and self.link.inbound.requires_grad:
            self.link.send_gradient(micro_batch, activation.grad)

    def abandon(self) -> None:
        """Drop what a failed step kept."""
        self._inputs.clear()
        self._outputs.clear()
        self.weight_gradients.abandon()
        self.current = None
