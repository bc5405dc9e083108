"""``apply(model, method)``: patch a stock model for the duration of a block, always restoring it.

The user-facing ``tokenprune.apply`` also takes a registered method name and fields (``tokenprune/api.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from .driver import Driver
from .family import family_for
from .report import PrefillReport

INSTALLED_ATTRIBUTE = "_tokenprune_driver"


@dataclass
class Session:
    """Handle yielded by ``apply``: the method and what its last prefill did."""

    method: object
    driver: Driver | None

    @property
    def installed(self) -> bool:
        return self.driver is not None

    @property
    def last_report(self) -> PrefillReport | None:
        return None if self.driver is None else self.driver.last_report


@contextmanager
def apply(model, method, questions: list[str] | None = None):
    """Apply ``method`` (a ``tokenprune.methods.Method``) inside ``model``'s text decoder.

    ``model``: a stock model of a registered family, or a loaded ``VLM`` (its ``.model``). A method that needs no
    hook (``baseline``) installs nothing: the stock forward runs. Otherwise the driver's hooks are installed and
    removed on exit, also when the block raises. The method's fields are checked against the model (layer
    indices, capabilities) before any model work. ``questions``: the question text of each sample of the calls
    made in the block (one per batch row), for methods that condition on the raw question (``DecoderInput.question``).
    """
    import torch

    if not isinstance(model, torch.nn.Module) and isinstance(getattr(model, "model", None), torch.nn.Module):
        model = model.model  # a loaded VLM
    family = family_for(model)
    method.validate(family.model_info(model))
    if getattr(model, INSTALLED_ATTRIBUTE, None) is not None:
        raise RuntimeError("a tokenprune method is already applied to this model; nest Compose([...]) instead")
    if questions is not None and (isinstance(questions, str) or not all(isinstance(q, str) for q in questions)):
        raise TypeError(f"apply(questions=...) takes a list of strings (one per sample), got {questions!r}")
    vision_hook = _resized_vision_call(family, model) if method.uses_before_processor else None
    try:
        if method.is_noop:
            yield Session(method, None)
            return
        driver = Driver(model, family, method, None if questions is None else list(questions))
        setattr(model, INSTALLED_ATTRIBUTE, driver)
        try:
            driver.install()
            yield Session(method, driver)
        finally:
            driver.remove()
            setattr(model, INSTALLED_ATTRIBUTE, None)
    finally:
        if vision_hook is not None:
            vision_hook.remove()


def _resized_vision_call(family, model):
    """A method that changes the input resolution (``before_processor``): the vision encoder gets the family's
    ``resized_vision_kwargs`` on every call (None when the family needs none)."""
    extra = dict(family.resized_vision_kwargs)
    if not extra:
        return None

    def add_kwargs(module, args, kwargs):
        return args, {**kwargs, **extra}

    return family.vision_model(model).register_forward_pre_hook(add_kwargs, with_kwargs=True)
