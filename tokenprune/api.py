"""``tokenprune.apply(model, method, **fields)``: the engine's ``apply`` with methods given by registered name."""

from __future__ import annotations

from contextlib import contextmanager

from .engine import apply as engine
from .methods import Method, create


@contextmanager
def apply(model, method: Method | str = "baseline", *, questions: list[str] | None = None, **fields):
    """Apply ``method`` (an instance, or a registered name plus fields) inside ``model``'s text decoder; the model
    is restored on exit, also when the block raises (see ``tokenprune.engine.apply.apply``). ``questions``: each
    sample's question text, for methods that condition on it (CDPruner ``relevance=clip``)."""
    if isinstance(method, str):
        method = create(method, **fields)
    elif fields:
        raise TypeError("pass fields only together with a method name")
    with engine.apply(model, method, questions=questions) as session:
        yield session
