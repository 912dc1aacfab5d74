"""Old module names from before the package was laid out by paper, kept importable as deprecated aliases.

``import mpisgd.ps.server`` still works and warns once, naming the new home; nothing else in the
package imports these names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Optional

OLD_TO_NEW = {
    "mpisgd.backend": "mpisgd.arrays",
    "mpisgd.config": "mpisgd.training.config",
    "mpisgd.distributed": "mpisgd.sync.optimizer",
    "mpisgd.testing": "mpisgd.faults",
    "mpisgd.optim.lars": "mpisgd.sync.lars",
    "mpisgd.optim.schedule": "mpisgd.sync.schedule",
    "mpisgd.optim.lbfgs": "mpisgd.sandblaster.lbfgs",
    "mpisgd.strategies": "mpisgd.training.registry",
    "mpisgd.strategies.common": "mpisgd.training.loop",
    "mpisgd.strategies.sync": "mpisgd.sync.trainer",
    "mpisgd.strategies.downpour": "mpisgd.downpour.job",
    "mpisgd.strategies.sandblaster": "mpisgd.sandblaster.job",
    "mpisgd.ps": "mpisgd.downpour",
    "mpisgd.ps.layout": "mpisgd.training.layout",
    "mpisgd.ps.windows": "mpisgd.downpour.windows",
    "mpisgd.ps.client": "mpisgd.downpour.client",
    "mpisgd.ps.server": "mpisgd.downpour.server",
    "mpisgd.ps.rules": "mpisgd.downpour.rules",
    "mpisgd.ps.sandblaster_protocol": "mpisgd.sandblaster.protocol",
    "mpisgd.ps.sandblaster_coordinator": "mpisgd.sandblaster.scheduler",
    "mpisgd.ps.sandblaster_shard": "mpisgd.sandblaster.shard",
    "mpisgd.ps.sandblaster_worker": "mpisgd.sandblaster.worker",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} is deprecated: import {self.new_name}", DeprecationWarning, stacklevel=3)
        return importlib.import_module(self.new_name)

    def exec_module(self, module: ModuleType) -> None:
        """The module is the new one, already executed."""


class DeprecatedModuleFinder(importlib.abc.MetaPathFinder):
    """Answers an old module name with the module at its new home."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        new_name = OLD_TO_NEW.get(fullname)
        if new_name is None:
            return None
        # "mpisgd.ps" must be a package so that "mpisgd.ps.server" can be found below it
        is_package = any(old.startswith(fullname + ".") for old in OLD_TO_NEW)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new_name), is_package=is_package)


def install() -> None:
    if not any(isinstance(finder, DeprecatedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(DeprecatedModuleFinder())
