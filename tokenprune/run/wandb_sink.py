"""Weights & Biases logging: config, per-sample metrics and table, summary metrics, the Pareto plot.

Offline by default (``WANDB_MODE=offline``; runs land in ``<run dir>/wandb``), online when the user sets
``WANDB_MODE=online`` or ``logger.mode=online``.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from .report import pareto_figure


class WandbSink:
    def __init__(self, plan, cfg):
        import wandb

        mode = plan.logger.get("mode") or os.environ.get("WANDB_MODE") or "offline"
        self.wandb = wandb
        self.run = wandb.init(project=plan.logger.get("project", "tokenprune"), entity=plan.logger.get("entity"),
                              dir=str(plan.output_dir), mode=mode, tags=list(plan.logger.get("tags") or []),
                              config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
        self.step = 0

    def log_sample(self, record: dict, labels: list[str]) -> None:
        metrics = {}
        for label in labels:
            run = record.get("runs", {}).get(label)
            if run is None or run.get("error") is not None:
                continue
            metrics[f"{label}/score"] = run["score"]
            metrics[f"{label}/visual_tokens_layer_mean"] = run.get("visual_tokens_layer_mean")
            metrics[f"{label}/prefill_ms"] = (run.get("timing") or {}).get("prefill_ms")
        self.run.log(metrics, step=self.step)
        self.step += 1

    def finish(self, records: list[dict], summary: dict, labels: list[str]) -> None:
        columns = ["index", "id", "question", "answer", "method", "prediction", "score", "error", "visual_tokens",
                   "visual_tokens_layer_mean", "tflops", "prefill_ms"]
        table = self.wandb.Table(columns=columns)
        for record in records:
            for label in labels:
                run = record.get("runs", {}).get(label, {})
                table.add_data(record["index"], record["id"], record.get("question"), str(record.get("answer")),
                               label, run.get("prediction"), run.get("score"), run.get("error") or record.get("error"),
                               run.get("visual_tokens"), run.get("visual_tokens_layer_mean"),
                               ((run.get("flops") or {}).get("tokenprune") or 0) / 1e12,
                               (run.get("timing") or {}).get("prefill_ms"))
        self.run.log({"samples": table})
        for label, entry in summary.items():
            for name, value in entry["metrics"].items():
                self.run.summary[f"{label}/{name}"] = value
            self.run.summary[f"{label}/visual_tokens_layer_mean"] = entry["visual_tokens_layer_mean"]
            self.run.summary[f"{label}/tflops"] = (entry["flops"]["tokenprune"] or 0) / 1e12
            self.run.summary[f"{label}/errors"] = entry["errors"]
            if "paired_delta" in entry:
                self.run.summary[f"{label}/paired_delta"] = entry["paired_delta"]["mean"]
        figure = pareto_figure([{"label": label, **entry} for label, entry in summary.items()],
                               x="visual_tokens_layer_mean", title="accuracy vs layer-averaged visual tokens")
        self.run.log({"pareto": self.wandb.Image(figure)})
        self.run.finish()
