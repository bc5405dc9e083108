"""Models spread over several devices (accelerate's ``dispatch_model`` / ``device_map``).

accelerate places each block (a decoder layer, the embeddings, the vision tower...) on one device and wraps the
block's ``forward`` (an instance attribute; the stock forward is kept as ``_old_forward``) with a hook that moves
the block's inputs to that device. The engine works with it as follows:

* its forward pre-hooks run before accelerate's wrapper, so everything the engine builds for a layer (the rows'
  hidden states, positions, rotary tables, masks, side inputs, layouts) is moved to that layer's device
  (``module_device``) in the layer's pre-hook, and scores are computed on the device of the layer they use;
* a layer forward the engine wraps (layer plans) goes *inside* accelerate's wrapper (``forward_slot``), so that the
  inputs reach it on the layer's device, and the previous forward is put back when the method is removed;
* layers whose weights accelerate offloads (to the CPU or disk, loaded only while their own forward runs) are
  refused: scores read a layer's projections outside its forward.
"""

from __future__ import annotations

import torch

from .contract import PruningInputError


def module_device(module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device where it placed the module, else the
    device of its first parameter (or buffer)."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def forward_slot(module) -> str:
    """The attribute that holds the forward to wrap: accelerate's ``_old_forward`` (the one its hook calls after
    moving the inputs) where it hooked the module, else ``forward``."""
    if getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


def refuse_offloaded(modules) -> None:
    """PruningInputError if accelerate offloads the weights of any of ``modules`` (or of their submodules)."""
    for module in modules:
        for sub in module.modules():
            hook = getattr(sub, "_hf_hook", None)
            if any(getattr(h, "offload", False) for h in [hook, *getattr(hook, "hooks", ())]):
                raise PruningInputError(
                    "a decoder layer's weights are offloaded by accelerate (to the CPU or disk, loaded only during its "
                    "forward); tokenprune reads a layer's projections outside its forward to score tokens. Give the "
                    "model enough GPUs (model.device_map=auto over more GPUs, or a smaller dtype)")
