"""``tokenprune.apply(model, method)``: patch a stock model for the duration of a block, always restoring it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from ..methods.base import Method, create
from .driver import Driver, PrefillReport

INSTALLED_ATTRIBUTE = "_tokenprune_driver"


@dataclass
class Session:
    """Handle yielded by ``apply``: the method and what its last prefill did."""

    method: Method
    driver: Driver | None

    @property
    def installed(self) -> bool:
        return self.driver is not None

    @property
    def last_report(self) -> PrefillReport | None:
        return None if self.driver is None else self.driver.last_report


@contextmanager
def apply(model, method: Method | str = "baseline", **fields):
    """Apply ``method`` (an instance, or a registered name plus fields) inside ``model``'s text decoder.

    A method that needs no hook (``baseline``) installs nothing: the stock forward runs. Otherwise the driver's
    hooks are installed and removed on exit, also when the block raises. The method's fields are checked
    against the model (layer indices, RoPE kind) before any model work.
    """
    from ..models.base import VLM, adapter_for

    if isinstance(model, VLM):
        model = model.model
    if isinstance(method, str):
        method = create(method, **fields)
    elif fields:
        raise TypeError("pass fields only together with a method name")
    adapter = adapter_for(model)
    method.validate(adapter.model_info(model))
    if getattr(model, INSTALLED_ATTRIBUTE, None) is not None:
        raise RuntimeError("a tokenprune method is already applied to this model; nest Compose([...]) instead")
    if method.is_noop:
        yield Session(method, None)
        return
    driver = Driver(model, adapter, method)
    setattr(model, INSTALLED_ATTRIBUTE, driver)
    try:
        driver.install()
        yield Session(method, driver)
    finally:
        driver.remove()
        setattr(model, INSTALLED_ATTRIBUTE, None)
