"""TokenLayout and its parts now live in the contract (``engine/contract.py``); this name stays importable."""

from .contract import IMAGE, KIND_NAMES, TEXT, VIDEO, TokenLayout, VisualGroup, VisualSpec  # noqa: F401
