"""The unpruned model: no hook, the stock forward runs."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register


@register("baseline")
@dataclass
class Baseline(Method):
    """Applies nothing (``apply`` installs no hook at all)."""
