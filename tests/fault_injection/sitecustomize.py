"""Runs at the start of every Python process with this folder on ``PYTHONPATH`` (see crash_once.py).

With ``TUNE_CIFAR_CRASH_ONCE`` set, it waits for ``tune_cifar.engine`` to be imported (an import
hook, so processes that never train import nothing more) and installs the crash there.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

TARGET = "tune_cifar.engine"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            import crash_once

            crash_once.install(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if os.environ.get("TUNE_CIFAR_CRASH_ONCE"):
    sys.meta_path.insert(0, _PatchOnImport())
