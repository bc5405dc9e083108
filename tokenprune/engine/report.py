"""What one pruned prefill did: per-layer token counts, kept rows, layer plans, method overhead; its FLOPs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .contract import LayerPlan, TokenLayout
from .flops import DecoderShape, report_flops


class OverheadTimer:
    """Time spent in method hooks (scoring + selection). CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._cpu_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start = None

    def __enter__(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._start = start
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._cpu_seconds += time.perf_counter() - self._start
        return False

    @property
    def milliseconds(self) -> float:
        if self.cuda:
            if self._events:
                self._events[-1][1].synchronize()
            return float(sum(start.elapsed_time(end) for start, end in self._events))
        return self._cpu_seconds * 1000.0


@dataclass
class PrefillReport:
    """What one pruned prefill did (sample 0 of the batch)."""

    prompt_tokens: int
    visual_tokens: int
    layer_tokens: list[int] = field(default_factory=list)  # sequence length entering each layer
    layer_visual: list[int] = field(default_factory=list)  # visual tokens entering each layer
    tokens_entering_decoder: int = 0
    visual_entering_decoder: int = 0
    kept_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> original rows of surviving visual tokens
    layer_plans: dict[int, LayerPlan] = field(default_factory=dict)  # layer -> plan that ran (identity plans omitted)
    plan_layouts: dict[int, TokenLayout] = field(default_factory=dict)  # layer -> layout its plan ran on
    stats: dict = field(default_factory=dict)  # method-reported numbers (segments, static fraction, ...)
    timer: OverheadTimer | None = None

    def record_layer(self, index: int, layout: TokenLayout, tokens: int, plan: LayerPlan | None) -> None:
        """Count what enters layer ``index`` (called once per layer, in order)."""
        if len(self.layer_tokens) != index:
            return
        self.layer_tokens.append(tokens)
        self.layer_visual.append(layout.num_visual)
        if plan is not None:
            self.layer_plans[index] = plan
            self.plan_layouts[index] = layout

    @property
    def kept(self) -> dict[int, list[int]]:
        """Layer -> original row indices of the visual tokens that survived the selection at that layer (read
        after the call: converting to lists synchronises with the device)."""
        return {layer: rows.tolist() for layer, rows in self.kept_rows.items()}

    @property
    def visual_layer_mean(self) -> float:
        return sum(self.layer_visual) / max(1, len(self.layer_visual))

    @property
    def overhead_ms(self) -> float:
        return self.timer.milliseconds if self.timer is not None else 0.0

    def flops(self, shape: DecoderShape) -> float:
        """tokenprune-convention prefill FLOPs from the per-layer token counts and the layer plans that ran."""
        planned = {layer: (self.plan_layouts[layer], plan) for layer, plan in self.layer_plans.items()}
        return report_flops(shape, self.layer_tokens, planned)
