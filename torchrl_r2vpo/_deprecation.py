"""Deprecated aliases for public names that moved to another module."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping


def moved(module: str, names: Mapping[str, str | tuple[str, str]]) -> Callable[[str], object]:
    """A module ``__getattr__`` that serves each moved name from its new module, with a
    :class:`DeprecationWarning` naming the new import.

    ``names`` maps an old name to its new module, or to ``(new module, new name)`` for a
    renamed one.

    Examples:
        >>> import warnings
        >>> getattr_ = moved("pkg.old", {"sqrt": ("math", "sqrt")})
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     getattr_("sqrt")(4.0)
        2.0
        >>> str(caught[0].message)
        'pkg.old.sqrt moved: use math.sqrt.'
    """

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = names[name]
        new_module, new_name = (target, name) if isinstance(target, str) else target
        warnings.warn(f"{module}.{name} moved: use {new_module}.{new_name}.", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__
