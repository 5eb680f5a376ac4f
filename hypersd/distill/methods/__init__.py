"""The bundled distillation methods: every module here is imported, and registers its methods.

A new method is one module here: its config dataclass, its ``Method`` subclass and a
``register(name, Config, MethodClass)`` line.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
