"""Running one stage's share of a step: its schedule's actions over its micro-batches.

:class:`StageWorker` knows the local sub-module and what it must keep between a micro-batch's forward and
its backward; the schedule says in which order, the :class:`~mpisgd.modelparallel.transport.PipelineLink`
moves the tensors. Every micro-batch's loss is divided by M, so the gradients summed over the micro-batches
are those of the mean loss over the whole (replica's) batch, as one unsplit step would compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn

from mpisgd.modelparallel.schedules import Action, ActionKind
from mpisgd.modelparallel.transport import PipelineLink

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


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

    def run(self, actions: Sequence[Action], inputs: Optional[Sequence[torch.Tensor]],
            targets: Optional[Sequence[Any]], loss_fn: Optional[LossFn]) -> Optional[float]:
        """Run ``actions``; returns the sum of the scaled micro-batch losses on the last stage, else None.

        ``inputs``: the micro-batches of x (first stage only); ``targets``: those of y (last stage only).
        """
        micro_batches = sum(1 for action in actions if action.kind is ActionKind.FORWARD)
        total = None
        for action in actions:
            self.current = action
            if action.kind is ActionKind.FORWARD:
                loss = self._forward(action.micro_batch, inputs, targets, loss_fn, micro_batches)
                if loss is not None:
                    total = loss if total is None else total + loss
            else:
                self._backward(action.micro_batch)
        self.current = None
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
        self.current = None
