"""Warnings that name params and point at the user's call of ``step()``."""
import os
import sys
import warnings

import torch

_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__],
                                                                                       torch))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside matrixopt and
    torch (whose wrappers — no_grad, the step hooks, GradScaler — call ``step``): the
    user's call of ``step()``, however many frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def warn_once(seen: set[str], names: list[str], message: str) -> None:
    """One RuntimeWarning ``message`` (``{}``: the names) for the ``names`` not yet in
    ``seen``, which records them; it points at the caller of ``step()``."""
    new = [n for n in names if n not in seen]
    if new:
        seen.update(new)
        warnings.warn(message.format(", ".join(new)), RuntimeWarning, stacklevel=caller_stacklevel())
