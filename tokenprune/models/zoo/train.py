"""Train the tiny models on the synthetic tasks: ``python -m tokenprune.models.zoo.train NAME``.

Deterministic (fixed seed, fixed number of steps, data generated from the seed on the fly), CPU-friendly
(fits in 15 minutes on 2 cores), and it writes an ordinary checkpoint directory — ``config.json``,
``model.safetensors``, the processor (tokenizer, chat template, image / video processor) and a model card —
that the stock classes load with ``from_pretrained``, exactly like a real checkpoint.

Training: teacher-forced cross-entropy on the answer tokens (and end-of-turn) of prompts built with the
model's own chat template; AdamW with warm-up and cosine decay; image and (Qwen2.5-VL) video batches
interleaved.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...data.sample import Sample
from ...data.synthetic import SyntheticImageQA, SyntheticVideoQA
from ..base import adapter_named, model_spec
from .checkpoints import CHECKPOINT_ROOT, TRAINED


@dataclass
class Recipe:
    """What one tiny model is trained on, and how."""

    steps: int
    batch_size: int = 32
    learning_rate: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    video_every: int = 0  # a video batch every n-th step (0: images only)
    image_tasks: list[str] = field(default_factory=lambda: ["colour_at", "shape_at", "count", "left_of"])
    video_tasks: list[str] = field(default_factory=lambda: ["direction", "first"])
    image_size: int = 168
    video_frames: int = 8
    video_frame_size: int = 112
    seed: int = 0
    eval_samples: int = 200


RECIPES = {
    "tiny_llava": Recipe(steps=1500),
    "tiny_qwen25vl": Recipe(steps=1500, video_every=3),
}


def build_prompt(processor, sample: Sample, answer: str | None) -> str:
    content = ([{"type": "video"}] if sample.video is not None else []) + [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": sample.question})
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if answer is None:
        return prompt
    return f"{prompt} {answer} {processor.tokenizer.eos_token}"


def collate(vlm, samples: list[Sample]) -> dict:
    """A padded training batch whose labels are the answer tokens and the end-of-turn token."""
    processor = vlm.processor
    tokenizer = processor.tokenizer
    full = [build_prompt(processor, s, str(s.answer)) for s in samples]
    kwargs = {}
    if samples[0].video is not None:
        kwargs.update(vlm.adapter.training_video_inputs(samples))
    else:
        kwargs["images"] = [image for s in samples for image in s.images]
    tokenizer.padding_side = "right"
    batch = processor(text=full, return_tensors="pt", padding=True, **kwargs)
    labels = torch.full_like(batch["input_ids"], -100)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        answer_length = len(tokenizer(f"{sample.answer} {tokenizer.eos_token}", add_special_tokens=False)["input_ids"])
        labels[row, length - answer_length : length] = batch["input_ids"][row, length - answer_length : length]
    batch["labels"] = labels
    return dict(batch)


def sample_stream(recipe: Recipe, video: bool):
    """An endless, seeded stream of training samples (split=train, disjoint from the test split)."""
    if video:
        dataset = SyntheticVideoQA(n_samples=10**9, seed=recipe.seed, split="train", frames=recipe.video_frames,
                                   frame_size=recipe.video_frame_size, tasks=recipe.video_tasks)
    else:
        dataset = SyntheticImageQA(n_samples=10**9, seed=recipe.seed, split="train", image_size=recipe.image_size,
                                   tasks=recipe.image_tasks)
    index = 0
    while True:
        yield dataset[index]
        index += 1


def evaluate(vlm, dataset, limit: int | None = None) -> float:
    """Greedy accuracy (%) of the unpruned model on a dataset, through the same path the runner uses."""
    correct, total = 0.0, 0
    eos = vlm.processor.tokenizer.eos_token_id
    vlm.model.eval()
    with torch.no_grad():
        for index in range(len(dataset) if limit is None else min(limit, len(dataset))):
            sample = dataset[index]
            inputs = vlm.prepare(sample)
            output = vlm.model.generate(**inputs, max_new_tokens=dataset.max_new_tokens, do_sample=False,
                                        eos_token_id=eos, pad_token_id=eos)
            prediction = vlm.decode(output[0, inputs["input_ids"].shape[1]:])
            correct += dataset.scorer.score(prediction, sample)
            total += 1
    return 100.0 * correct / max(1, total)


def held_out(recipe: Recipe, video: bool, n: int):
    if video:
        return SyntheticVideoQA(n_samples=n, seed=recipe.seed, split="test", frames=recipe.video_frames,
                                frame_size=recipe.video_frame_size, tasks=recipe.video_tasks)
    return SyntheticImageQA(n_samples=n, seed=recipe.seed, split="test", image_size=recipe.image_size,
                            tasks=recipe.image_tasks)


def train(name: str, out: Path, steps: int | None = None, seed: int | None = None, log_every: int = 50,
          evaluate_after: bool = True) -> dict:
    if name not in RECIPES:
        raise ValueError(f"no training recipe for {name!r}; trainable models: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    if steps is not None:
        recipe = Recipe(**{**recipe.__dict__, "steps": steps})
    if seed is not None:
        recipe = Recipe(**{**recipe.__dict__, "seed": seed})
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    spec = model_spec(name)
    adapter = adapter_named(spec.family)
    from ..base import VLM

    model = adapter.build_random(spec.random_config(), torch.float32, "sdpa", seed=recipe.seed)
    vlm = VLM(name=name, model=model, processor=spec.random_processor(), adapter=adapter)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay,
                                  betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    images, videos = sample_stream(recipe, False), sample_stream(recipe, True) if recipe.video_every else None
    model.train()
    started, history = time.perf_counter(), []
    for step in range(recipe.steps):
        use_video = bool(recipe.video_every) and step % recipe.video_every == recipe.video_every - 1
        stream = videos if use_video else images
        batch = collate(vlm, [next(stream) for _ in range(recipe.batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append(float(loss))
        if log_every and (step + 1) % log_every == 0:
            recent = history[-log_every:]
            print(f"step {step + 1}/{recipe.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
    seconds = time.perf_counter() - started
    model.eval()
    result = {"name": name, "steps": recipe.steps, "seed": recipe.seed, "train_seconds": round(seconds, 1),
              "final_loss": round(sum(history[-50:]) / max(1, len(history[-50:])), 4), "recipe": recipe.__dict__}
    if evaluate_after:
        result["heldout_image_accuracy"] = round(evaluate(vlm, held_out(recipe, False, recipe.eval_samples)), 1)
        if recipe.video_every:
            result["heldout_video_accuracy"] = round(evaluate(vlm, held_out(recipe, True, recipe.eval_samples)), 1)
    save(vlm, out, result)
    return result


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def save(vlm, out: Path, result: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vlm.model.save_pretrained(out, safe_serialization=True)
    vlm.processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    (out / "README.md").write_text(model_card(vlm, result))


def model_card(vlm, result: dict) -> str:
    config = vlm.model.config
    text = config.get_text_config()
    vision = config.vision_config
    parameters = sum(p.numel() for p in vlm.model.parameters())
    recipe = result["recipe"]
    lines = [
        f"# {result['name']}",
        "",
        f"A tiny `{type(vlm.model).__name__}` trained here from scratch on tokenprune's synthetic tasks, so the",
        "embedded default run measures real accuracy on CPU. Not a general-purpose model.",
        "",
        "## Architecture",
        f"- decoder: {text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
        f"{text.num_attention_heads} heads ({text.num_key_value_heads} KV heads), MLP {text.intermediate_size}, "
        f"vocabulary {text.vocab_size} (word level)",
        f"- vision: {vision.model_type}, patch {vision.patch_size}, hidden {vision.hidden_size}",
        f"- {parameters / 1e6:.2f} M parameters (float32)",
        "",
        "## Data",
        f"- synthetic image QA (`synthetic_image`, split `train`, seed {recipe['seed']}): tasks "
        f"{', '.join(recipe['image_tasks'])}; {recipe['image_size']} px images",
    ]
    if recipe["video_every"]:
        lines.append(f"- synthetic video QA (`synthetic_video`, split `train`): tasks {', '.join(recipe['video_tasks'])}; "
                     f"{recipe['video_frames']} frames of {recipe['video_frame_size']} px; every "
                     f"{recipe['video_every']}rd batch")
    lines += [
        "",
        "## Training",
        f"- {result['steps']} steps x batch {recipe['batch_size']}, AdamW lr {recipe['learning_rate']} (warm-up "
        f"{recipe['warmup']}, cosine), seed {result['seed']}; {result['train_seconds']} s on this machine's CPU",
        f"- final training loss {result['final_loss']}",
        f"- reproduce: `python -m tokenprune.models.zoo.train {result['name']}`",
        "",
        "## Held-out accuracy (split `test`, unpruned, greedy)",
    ]
    if "heldout_image_accuracy" in result:
        lines.append(f"- synthetic image QA: {result['heldout_image_accuracy']}% on {recipe['eval_samples']} samples")
    if "heldout_video_accuracy" in result:
        lines.append(f"- synthetic video QA: {result['heldout_video_accuracy']}% on {recipe['eval_samples']} samples")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenprune.models.zoo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--out", default=None, help=f"checkpoint directory (default: the packaged {CHECKPOINT_ROOT}/NAME)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else CHECKPOINT_ROOT / TRAINED[args.name]
    result = train(args.name, out, steps=args.steps, seed=args.seed, evaluate_after=not args.no_eval)
    print(json.dumps({k: v for k, v in result.items() if k != "recipe"}, indent=2))


if __name__ == "__main__":
    main()
