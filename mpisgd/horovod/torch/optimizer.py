"""Horovod's DistributedOptimizer: the user's optimizer class, subclassed, reducing gradients during backward.

As in Horovod, ``DistributedOptimizer(opt, ...)`` returns an instance of a class made on the fly that
inherits from ``type(opt)``, so it *is* a torch optimizer of the user's kind (``isinstance`` and
learning-rate schedulers keep working). A post-accumulate-grad hook on every parameter starts that
gradient's allreduce (named after the parameter) as soon as backward produced it, k times with
``backward_passes_per_step=k``; ``step()`` waits for them (``synchronize``) before updating.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Optional

import torch

from mpisgd.horovod.torch import basics
from mpisgd.horovod.torch.basics import Adasum, Average
from mpisgd.horovod.torch.compression import Compression, Compressor
from mpisgd.horovod.torch.functions import broadcast_object
from mpisgd.horovod.torch.mpi_ops import (
    allreduce_async_,
    grouped_allreduce_async_,
    sparse_allreduce_async,
    synchronize,
)
from mpisgd.horovod.torch.process_sets import ProcessSet, global_process_set


def split_list(items: list, parts: int) -> list:
    """``items`` cut into ``parts`` consecutive pieces whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append(items[start:end])
        start = end
    return [p for p in pieces if p]


class _DistributedOptimizer(torch.optim.Optimizer):
    """The methods copied into the dynamic subclass (see :func:`DistributedOptimizer`)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step=1, op=Average,
                 gradient_predivide_factor=1.0, groups=None, sparse_as_dense=False,
                 process_set=global_process_set, defaults=None):
        try:
            super(self.__class__, self).__init__(params)
        except TypeError:  # an optimizer class whose constructor needs more than params
            torch.optim.Optimizer.__init__(self, params, defaults or {})
        if defaults is not None:
            self.defaults = dict(defaults)
        self._compression = compression
        if named_parameters is not None:
            named_parameters = list(named_parameters)
        else:
            named_parameters = [(f"allreduce.noname.{i}.{j}", v) for i, group in enumerate(self.param_groups)
                                for j, v in enumerate(group["params"])]
        if any(not isinstance(p, tuple) for p in named_parameters):
            raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced "
                             "by model.named_parameters().")
        names = [k for k, _ in named_parameters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError("Parameter names in named_parameters must be unique. Found duplicates: "
                             + ", ".join(duplicates))
        all_ids = {id(v) for group in self.param_groups for v in group["params"]}
        unnamed = all_ids - {id(v) for _, v in named_parameters}
        if unnamed:
            raise ValueError("named_parameters was specified, but one or more model parameters were not named. "
                             "Python object ids: " + ", ".join(str(i) for i in sorted(unnamed)))
        self._parameter_names = {id(v): k for k, v in sorted(named_parameters, key=lambda kv: kv[0])}
        self.backward_passes_per_step = backward_passes_per_step
        self._allreduce_delay = {id(v): backward_passes_per_step for _, v in named_parameters}
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self._handles: dict = {}  # id(param) or a group tuple -> (params, handle, contexts)
        self._requires_update: dict = {}
        self._synchronized = False
        self._should_synchronize = True
        self._groups = groups
        self._group_of: dict = {}
        self._group_counts: dict = {}
        self._hook_handles: list = []
        if groups is not None and not (isinstance(groups, list) or groups > 0):
            raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
        if isinstance(groups, list):
            seen: set = set()
            for group in groups:
                for p in group:
                    if not isinstance(p, torch.Tensor):
                        raise ValueError("groups must consist of torch.Tensor.")
                    if id(p) in seen:
                        raise ValueError("A parameter can only appear once in groups.")
                    seen.add(id(p))
        if self.process_set.included() and basics.size() > 1:
            self._register_hooks()

    def _register_hooks(self) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if self._groups is not None:
            # every rank forms the same groups: rank 0's parameter order decides
            order = broadcast_object([self._parameter_names.get(id(p)) for p in params], root_rank=0,
                                     name="DistributedOptimizer.parameter_order", process_set=self.process_set)
            params = sorted(params, key=lambda p: order.index(self._parameter_names.get(id(p))))
            if isinstance(self._groups, list):
                wanted = {id(p) for p in params}
                p_groups = [[p for p in group if id(p) in wanted] for group in self._groups]
                grouped = {id(p) for g in p_groups for p in g}
                p_groups += [[p] for p in params if id(p) not in grouped]
            else:
                p_groups = split_list(params, self._groups)
            for group in p_groups:
                key = tuple(id(p) for p in group)
                for p in group:
                    self._group_of[id(p)] = (key, group)
                self._group_counts[key] = 0
        for p in params:
            self._requires_update[id(p)] = p
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._make_hook(p)))

    def _allreduce_grad_async(self, p: torch.Tensor) -> tuple:
        if p.grad is None:  # unused this step here, maybe used elsewhere: contribute zeros
            p.grad = p.data.new(p.size()).zero_()
        name = self._parameter_names.get(id(p))
        tensor = p.grad
        if tensor.is_sparse:
            if not self.sparse_as_dense:
                return sparse_allreduce_async(tensor, name=name, op=self.op, process_set=self.process_set), None
            tensor = tensor.to_dense()
        compressed, context = self._compression.compress(tensor)
        prescale, postscale = ((1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor)
                               if self.op == Average else (1.0, 1.0))
        handle = allreduce_async_(compressed, name=name, op=self.op, prescale_factor=prescale,
                                  postscale_factor=postscale, process_set=self.process_set)
        return handle, context

    def _grouped_allreduce_grad_async(self, group: list) -> tuple:
        for p in group:
            if p.grad is None:
                p.grad = p.data.new(p.size()).zero_()
        compressed, contexts = zip(*[self._compression.compress(p.grad) for p in group])
        handle = grouped_allreduce_async_(list(compressed), name=self._parameter_names.get(id(group[0])),
                                          op=self.op, process_set=self.process_set)
        return handle, contexts

    def _make_hook(self, p: torch.Tensor) -> Any:
        def hook(*ignore: Any) -> None:
            key = id(p)
            if key in self._handles and self._handles[key][1] is not None and self._allreduce_delay[key] <= 0:
                raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                     "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
            assert p.grad is not None and not p.grad.requires_grad
            assert self._allreduce_delay[key] > 0
            handle, context = None, None
            self._allreduce_delay[key] -= 1
            if self._allreduce_delay[key] == 0:
                if self._groups is not None:
                    group_key, group = self._group_of[key]
                    self._group_counts[group_key] += 1
                    if self._group_counts[group_key] == len(group):
                        handle, contexts = self._grouped_allreduce_grad_async(group)
                        for q in group:
                            self._handles.pop(id(q), None)
                        self._handles[group_key] = (group, handle, contexts)
                        self._group_counts[group_key] = 0
                    return
                handle, context = self._allreduce_grad_async(p)
            self._handles[key] = ([p], handle, context)
        return hook

    def synchronize(self) -> None:
        """Wait for every gradient's reduction (starting those whose hooks did not fire) and install the
        results into ``p.grad``."""
        if not self.process_set.included():
            self._synchronized = True
            return
        completed = {i for key, (params, handle, _) in self._handles.items() if handle is not None
                     for i in (key if isinstance(key, tuple) else (key,))}
        for key, p in self._requires_update.items():
            if key not in completed:
                self._handles.pop(key, None)
                if self._groups is None:
                    self._handles[key] = ([p], *self._allreduce_grad_async(p))
        if self._groups is not None:  # groups with members that produced no gradient
            for group_key, group in {self._group_of[k][0]: self._group_of[k][1]
                                     for k in self._requires_update if k not in completed}.items():
                self._handles[group_key] = (group, *self._grouped_allreduce_grad_async(group))
                self._group_counts[group_key] = 0
        for key, (params, handle, context) in self._handles.items():
            if isinstance(key, tuple):
                outputs = synchronize(handle)
                for p, output, ctx in zip(params, outputs, context):
                    self._allreduce_delay[id(p)] = self.backward_passes_per_step
                    p.grad.set_(self._compression.decompress(output, ctx))
                continue
            p = params[0]
            output = synchronize(handle)
            self._allreduce_delay[key] = self.backward_passes_per_step
            if p.grad.is_sparse:
                aggregated = self._compression.decompress(output, context)
                if not aggregated.is_sparse:
                    aggregated = aggregated.to_sparse()
                p.grad.zero_().add_(aggregated)
            else:
                p.grad.set_(self._compression.decompress(output, context))
        self._handles.clear()
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self):
        """``step()`` inside this context does not synchronize (after an explicit ``synchronize()``)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in "
                              "your code.", stacklevel=2)
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can cause "
                                 "a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for key in self._allreduce_delay:
            self._allreduce_delay[key] = passes

    def load_state_dict(self, *args, **kwargs):
        self._handles = {}
        self._synchronized = False
        self._should_synchronize = True
        for key in self._allreduce_delay:
            self._allreduce_delay[key] = self.backward_passes_per_step
        super(self.__class__, self).load_state_dict(*args, **kwargs)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,
                         compression: type[Compressor] = Compression.none, backward_passes_per_step: int = 1,
                         op: Any = Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: Optional[Any] = None, sparse_as_dense: bool = False,
                         process_set: ProcessSet = global_process_set) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that gradients are reduced over the process set before each update.

    Args (as Horovod's):
        optimizer: the user's torch optimizer; the result is an instance of a subclass of its class.
        named_parameters: ``model.named_parameters()``: names match each gradient's allreduce across ranks.
        compression: ``Compression.none`` or ``Compression.fp16``.
        backward_passes_per_step: backward passes accumulated locally before a reduction.
        op: Average (default), Sum or Adasum (Adasum reduces gradients; see docs/horovod.rst).
        gradient_predivide_factor: with Average, scale by 1/f before the sum and f/size after.
        num_groups: deprecated spelling of ``groups``.
        groups: a number of groups, or lists of parameters, reduced together as one grouped allreduce.
        sparse_as_dense: reduce sparse gradients as dense tensors instead of gathering them.
        process_set: the ranks whose gradients are reduced.
    """
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                      DeprecationWarning, stacklevel=2)
        if groups is None:
            groups = num_groups
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if op == Adasum and process_set is not global_process_set:
        raise NotImplementedError("Adasum does not support non-global process sets yet.")
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
               gradient_predivide_factor, groups, sparse_as_dense, process_set, optimizer.defaults)
