"""Train the tiny models on the synthetic tasks: ``python -m tokenprune.models.zoo.train NAME``.

Deterministic (fixed seed, fixed number of steps, data generated from the seed on the fly), CPU-friendly
(fits in 15 minutes on 2 cores), and it writes an ordinary checkpoint directory — ``config.json``,
``model.safetensors``, the processor (tokenizer, chat template, image / video processor) and a model card —
that the stock classes load with ``from_pretrained``, exactly like a real checkpoint.

Training objective (all terms on the stock model; the helpers are training-only and not saved):
- teacher-forced cross-entropy on the answer tokens (and end-of-turn) of prompts built with the model's own
  chat template, with extra question turns about the same image (more lookups per image forward);
- dense auxiliary heads on the visual tokens entering the decoder (colour, shape, grid cell and motion under
  each token), which make the vision tower informative within minutes;
- a two-hop lookup taught directly: in the read layer, fixed heads of the row that predicts an answer attend
  to the question's key words (``-log`` attention mass) and a linear key probe must read those words from
  that layer's output; in the look layer, fixed heads attend to the tokens of the objects the answer depends
  on. Without the probe the read heads fetch the words too faintly (tiny value / output maps) and the
  answer loss sits at an image-blind plateau for hundreds of steps.
A CLIP-style absolute position table starts from 2-D sine-cosine values; the decoders use a large RoPE base
(1e6, as Qwen2.5-VL) so that content matching survives the 150-token distance to the image. AdamW with
warm-up and cosine decay; image and (Qwen2.5-VL) video batches interleaved.
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
from ...data.synthetic import COLOURS, DEFAULT_IMAGE_TASKS, SHAPES, SyntheticImageQA, SyntheticVideoQA, ask_about
from ..base import adapter_named, model_spec
from ...engine.attention import AttentionMath
from ...engine.scores import project_keys, project_queries
from .checkpoints import CHECKPOINT_ROOT, TRAINED


@dataclass
class Recipe:
    """What one tiny model is trained on, and how."""

    steps: int
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    video_every: int = 0  # a video batch every n-th step (0: images only)
    video_batch_size: int = 8
    image_tasks: list[str] = field(default_factory=lambda: list(DEFAULT_IMAGE_TASKS))
    video_tasks: list[str] = field(default_factory=lambda: ["direction", "first"])
    image_size: int = 168
    video_frames: int = 8
    video_frame_size: int = 112
    seed: int = 0
    eval_samples: int = 200
    auxiliary_weight: float = 1.0  # dense per-token supervision of the visual features (training only)
    extra_turns: int = 3  # extra questions (of image_tasks) per training image (multi-turn)
    look_layer: int = 2  # decoder layer whose attention is guided to the evidence (training only)
    position_scale: float = 1.0  # initial scale of an absolute position table (see initialise_positions)
    look_weight: float = 1.0  # weight of -log(attention mass on the evidence tokens)
    look_heads: int = 2  # the first look_heads query heads of look_layer are guided (head mean)
    read_layer: int = 0  # decoder layer whose guided heads read the question's key words (training only)
    read_weight: float = 1.0  # weight of -log(attention mass on the key words of the question)
    key_weight: float = 1.0  # weight of the key probe (the read layer's output must carry the key words)
    look_auxiliary: bool = True  # the auxiliary heads also read the visual rows entering the look layer


RECIPES = {
    "tiny_llava": Recipe(steps=1100),
    "tiny_qwen25vl": Recipe(steps=900, video_every=2),
}


def conversation(sample: Sample, extra_turns: int, tasks: list[str],
                 rng: random.Random) -> tuple[list[dict], list[list[list[int]] | None]]:
    """The sample's question and answer, then ``extra_turns`` more questions of ``tasks`` about the same image.
    Every answer becomes a training target, so one image forward teaches several lookups; the first turn is
    exactly what the model sees at evaluation.

    Returns the messages and, per turn, its evidence: groups of indices of the objects its answer depends on
    (``meta["evidence"]`` format; None: unknown)."""
    visual = [{"type": "video"}] if sample.video is not None else [{"type": "image"} for _ in sample.images]
    turns = [(sample.question, str(sample.answer), sample.meta.get("evidence"))]
    objects = sample.meta.get("objects") or []
    for _ in range(extra_turns if objects else 0):
        turn = ask_about(objects, rng.choice(tasks), rng) or ask_about(objects, "colour_at", rng)
        turns.append(turn)
    messages = []
    for index, (question, answer, _) in enumerate(turns):
        content = (visual if index == 0 else []) + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return messages, [evidence for _, _, evidence in turns]


def capture_layer_input(layer, captured: dict, key: str):
    """Pre-hook storing ``(hidden_states, position_embeddings)`` entering ``layer`` as ``captured[key]``."""
    return layer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(
            {key: (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])}),
        with_kwargs=True)


def placeholder_ids(model) -> torch.Tensor:
    """Token ids of the model's image / video placeholders (the rows that carry visual tokens)."""
    config = model.config
    return torch.tensor([i for i in (config.image_token_id, getattr(config, "video_token_id", None)) if i is not None])


@dataclass
class Lookup:
    """One answer of a training batch: the row that predicts its first token, and what it depends on."""

    sample: int  # row of the batch
    query_row: int  # sequence position whose next-token prediction is the answer's first token
    evidence: list[list[int]] | None  # groups of object indices (one per thing to look up), None: unknown


def query_index(lookups: list[Lookup]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n], [n])``: batch rows and sequence positions of the lookups' query rows (for advanced indexing)."""
    return torch.tensor([lookup.sample for lookup in lookups]), torch.tensor([lookup.query_row for lookup in lookups])


def collate(vlm, samples: list[Sample], extra_turns: int = 0, rng: random.Random | None = None,
            tasks: list[str] = ("colour_at",)) -> tuple[dict, list[Lookup]]:
    """A padded training batch whose labels are each answer's tokens and its end-of-turn token, and the
    batch's lookups (one per answer)."""
    processor = vlm.processor
    tokenizer = processor.tokenizer
    rng = rng or random.Random(0)
    conversations = [conversation(s, extra_turns, list(tasks), rng) for s in samples]
    texts = [processor.apply_chat_template(m, tokenize=False) for m, _ in conversations]
    kwargs = {}
    if samples[0].video is not None:
        kwargs.update(vlm.adapter.training_video_inputs(samples))
    else:
        kwargs["images"] = [image for s in samples for image in s.images]
    tokenizer.padding_side = "right"
    batch = processor(text=texts, return_tensors="pt", padding=True, **kwargs)
    labels = torch.full_like(batch["input_ids"], -100)
    visual_ids = placeholder_ids(vlm.model)
    lookups = []
    for row, (messages, evidence) in enumerate(conversations):
        # the placeholder is one token in the text and n_visual tokens in input_ids
        expansion = int(torch.isin(batch["input_ids"][row], visual_ids).sum()) - 1
        for turn in range(len(messages) // 2):
            prefix = processor.apply_chat_template(messages[: 2 * turn + 1], tokenize=False, add_generation_prompt=True)
            start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) + expansion
            answer = messages[2 * turn + 1]["content"][0]["text"]
            length = len(tokenizer(f"{answer} {tokenizer.eos_token}", add_special_tokens=False)["input_ids"])
            labels[row, start : start + length] = batch["input_ids"][row, start : start + length]
            lookups.append(Lookup(row, start - 1, evidence[turn]))
    batch["labels"] = labels
    return dict(batch), lookups


MOTIONS = ("background", "still", "left", "right", "up", "down")


class AuxiliaryHeads(torch.nn.Module):
    """Training-only heads on the visual tokens entering the decoder: the colour, shape and motion of the object
    under each token (0: background), the 3 x 3 grid cell the token lies in, and the token's (x, y) centre as
    two numbers (a linear coordinate makes "left of" and motion directions a comparison of two read-outs).
    Dense supervision makes the vision tower and projector informative within minutes; the heads are not part
    of the saved model."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.shape = torch.nn.Linear(hidden, len(SHAPES) + 1)
        self.cell = torch.nn.Linear(hidden, 9)
        self.motion = torch.nn.Linear(hidden, len(MOTIONS))
        self.centre = torch.nn.Linear(hidden, 2)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``features``: ``[n, hidden]`` visual rows; ``labels``: ``[n, 6]`` (colour, shape, cell, motion, and
        the centre's x and y in thousandths)."""
        ce = torch.nn.functional.cross_entropy
        centre = torch.nn.functional.mse_loss(self.centre(features), labels[:, 4:6].float() / 1000 * 4)
        return (ce(self.colour(features), labels[:, 0]) + ce(self.shape(features), labels[:, 1])
                + ce(self.cell(features), labels[:, 2]) + ce(self.motion(features), labels[:, 3]) + centre) / 5


def token_labels(steps: list[list], rows: int, cols: int, motions: list[list[int]] | None = None) -> torch.Tensor:
    """Per visual token (raster order, ``len(steps)`` temporal steps of ``rows x cols``): colour id, shape id
    (0 = background) of the object under the token's centre, its 3 x 3 cell, and the object's motion id
    (``MOTIONS``; "still" when ``motions`` is None), and the token centre's x and y in thousandths of the
    frame. ``steps[t]``: boxes at step t; ``motions[t]``: one id per box."""
    colour_ids = {name: i + 1 for i, name in enumerate(COLOURS)}
    shape_ids = {name: i + 1 for i, name in enumerate(SHAPES)}
    labels = []
    for t, frame_boxes in enumerate(steps):
        for r in range(rows):
            for c in range(cols):
                x, y = (c + 0.5) / cols, (r + 0.5) / rows
                colour = shape = motion = 0
                for i, (x0, y0, x1, y1, name, kind) in enumerate(frame_boxes):  # later objects are drawn on top
                    if x0 <= x <= x1 and y0 <= y <= y1:
                        colour, shape = colour_ids[name], shape_ids[kind]
                        motion = motions[t][i] if motions is not None else MOTIONS.index("still")
                labels.append((colour, shape, 3 * min(2, int(3 * y)) + min(2, int(3 * x)), motion,
                               round(1000 * x), round(1000 * y)))
    return torch.tensor(labels, dtype=torch.long)


def video_steps(frame_objects: list[list], steps: int) -> tuple[list[list], list[list[int]]]:
    """Boxes and motion ids per temporal step (two frames per step): the boxes of the step's second frame, and
    each object's motion from the first frame to the second ("still" if it has just appeared)."""
    boxes, motions = [], []
    for t in range(steps):
        before, after = frame_objects[min(2 * t, len(frame_objects) - 1)], frame_objects[min(2 * t + 1, len(frame_objects) - 1)]
        step_motions = []
        for i, box in enumerate(after):
            if i >= len(before):
                step_motions.append(MOTIONS.index("still"))
                continue
            dx = (box[0] + box[2] - before[i][0] - before[i][2]) / 2
            dy = (box[1] + box[3] - before[i][1] - before[i][3]) / 2
            if max(abs(dx), abs(dy)) < 1e-3:
                step_motions.append(MOTIONS.index("still"))
            elif abs(dx) >= abs(dy):
                step_motions.append(MOTIONS.index("right" if dx > 0 else "left"))
            else:
                step_motions.append(MOTIONS.index("down" if dy > 0 else "up"))
        boxes.append(after)
        motions.append(step_motions)
    return boxes, motions


def batch_token_labels(vlm, samples: list[Sample], batch: dict) -> torch.Tensor:
    """Labels of every visual row of the batch, in the order the decoder sees them (sample by sample)."""
    labels = []
    for row, sample in enumerate(samples):
        spec = _visual_spec(vlm, batch, row)
        if sample.video is not None:
            (steps, rows, cols), = spec.video_grids
            step_boxes, motions = video_steps(sample.meta["frame_objects"], steps)
            labels.append(token_labels(step_boxes, rows, cols, motions))
        else:
            (_, rows, cols), = spec.image_grids
            labels.append(token_labels([sample.meta["objects"]], rows, cols))
    return torch.cat(labels)


def _visual_spec(vlm, batch: dict, row: int):
    return vlm.adapter.visual_specs(vlm.model, {"input_ids": batch["input_ids"][row : row + 1],
                                                  **{k: batch.get(k) for k in vlm.adapter.capture_keys if k in batch}})[0]


def evidence_masks(vlm, samples: list[Sample], batch: dict, lookups: list[Lookup], heads: int) -> torch.Tensor:
    """``[n_lookups, heads, L]``: per lookup and guided head, the visual rows to look at — tokens whose centre
    lies in the box of an object of the evidence group ``head % n_groups`` (video: of every temporal step, or
    of the first / second half of the steps where ``meta["evidence_when"]`` says "start" / "end" for that
    group). All false for a lookup without evidence."""
    visual_ids = placeholder_ids(vlm.model)
    covered = {}  # row -> per object index, [n_visual] bool
    halves = {}  # row -> {"start" | "end": [n_visual] bool} (videos)
    for row, sample in enumerate(samples):
        spec = _visual_spec(vlm, batch, row)
        if sample.video is not None:
            (steps, rows, cols), = spec.video_grids
            step_boxes, _ = video_steps(sample.meta["frame_objects"], steps)
            count = max(len(b) for b in step_boxes)
            covered[row] = [torch.cat([token_labels([[b[i]] if i < len(b) else []], rows, cols)[:, 0] > 0
                                       for b in step_boxes]) for i in range(count)]
            step_of_token = torch.arange(steps).repeat_interleave(rows * cols)  # [n_visual]
            halves[row] = {"start": step_of_token < (steps + 1) // 2, "end": step_of_token >= steps // 2}
        else:
            (_, rows, cols), = spec.image_grids
            covered[row] = [token_labels([[box]], rows, cols)[:, 0] > 0 for box in sample.meta["objects"]]
    masks = torch.zeros(len(lookups), heads, batch["input_ids"].shape[1], dtype=torch.bool)
    for n, lookup in enumerate(lookups):
        groups = [group for group in (lookup.evidence or []) if group]
        if not groups:
            continue
        objects = covered[lookup.sample]
        visual_rows = torch.isin(batch["input_ids"][lookup.sample], visual_ids).nonzero().squeeze(1)  # [n_visual]
        when = samples[lookup.sample].meta.get("evidence_when")
        for head in range(heads):
            group = groups[head % len(groups)]
            mask = torch.stack([objects[i] for i in group]).any(dim=0)
            if when:
                mask = mask & halves[lookup.sample][when[head % len(groups)]]
            masks[n, head, visual_rows] = mask
    return masks


# Words that name what to look up: colours and grid-cell words.
KEY_WORDS = (*COLOURS, "top", "middle", "bottom", "left", "centre", "right")
USER_MARKERS = ("USER:", "user")  # the token that opens a user turn (LLaVA, Qwen chat templates)


def key_word_masks(vlm, batch: dict, lookups: list[Lookup], heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per lookup, the key words (``KEY_WORDS``) of its own question (the user turn that ends at its query row):

    - ``[n_lookups, heads, L]`` masks of the rows each guided head reads: with exactly two colour words (which
      of two objects), head h reads the h-th; otherwise every guided head reads every key word;
    - ``[n_lookups, 2]`` targets of the key probe: the first and the last key word, as indices into
      ``KEY_WORDS`` (-100: the question has none)."""
    tokenizer = vlm.processor.tokenizer
    key_index = {tokenizer.convert_tokens_to_ids(word): n for n, word in enumerate(KEY_WORDS)}
    colour_ids = set(tokenizer.convert_tokens_to_ids(list(COLOURS)))
    user_ids = {i for i in tokenizer.convert_tokens_to_ids(list(USER_MARKERS)) if i != tokenizer.unk_token_id}
    masks = torch.zeros(len(lookups), heads, batch["input_ids"].shape[1], dtype=torch.bool)
    targets = torch.full((len(lookups), 2), -100, dtype=torch.long)
    for n, lookup in enumerate(lookups):
        ids = batch["input_ids"][lookup.sample].tolist()
        rows = []
        for row in range(lookup.query_row - 1, -1, -1):
            if ids[row] in user_ids:
                break
            if ids[row] in key_index:
                rows.append(row)
        rows.reverse()
        if not rows:
            continue
        targets[n] = torch.tensor([key_index[ids[rows[0]]], key_index[ids[rows[-1]]]])
        colours = [row for row in rows if ids[row] in colour_ids]
        for head in range(heads):
            masks[n, head, [colours[head % 2]] if len(colours) == 2 else rows] = True
    return masks, targets


class KeyProbe(torch.nn.Module):
    """Training-only linear read-outs of the first and the last key word of a question from the residual stream
    at the query row, right after the read layer. Guiding the read heads' attention is not enough: their value /
    output maps start tiny, so the word they fetch is too faint for the look layer's queries, and the two-hop
    lookup (read the question, then look at the image) stalls for hundreds of steps. Asking the residual to
    carry the words makes the read heads copy them at once."""

    def __init__(self, hidden: int):
        super().__init__()
        self.first = torch.nn.Linear(hidden, len(KEY_WORDS))
        self.last = torch.nn.Linear(hidden, len(KEY_WORDS))

    def loss(self, hidden: torch.Tensor, lookups: list[Lookup], targets: torch.Tensor) -> torch.Tensor:
        """``hidden``: ``[B, L, d]`` leaving the read layer; ``targets``: ``[n_lookups, 2]``."""
        rows = hidden[query_index(lookups)]  # [n_lookups, d]
        ce = torch.nn.functional.cross_entropy
        return (ce(self.first(rows), targets[:, 0], ignore_index=-100)
                + ce(self.last(rows), targets[:, 1], ignore_index=-100)) / 2


def evidence_attention(math: AttentionMath, hidden: torch.Tensor, position_embeddings, lookups: list[Lookup],
                       masks: torch.Tensor, heads: int) -> torch.Tensor:
    """Per lookup, the attention mass that the query row puts on its evidence rows in a layer, averaged over
    the first ``heads`` query heads, recomputed from the layer's own projections (its family's attention math).
    Fixed heads (not the best head of each lookup) keep the read-out simple: the evidence always arrives through
    the same heads. ``hidden``: ``[B, L, d]`` entering the layer; ``masks``: ``[n, heads, L]``. Returns ``[n]``."""
    samples, rows = query_index(lookups)
    cos, sin = (table.expand(hidden.shape[0], -1, -1) for table in position_embeddings)  # [B, L, hd]
    q = project_queries(math, hidden[samples, rows][:, None], torch.zeros(1, dtype=torch.long),
                        cos[samples, rows][:, None], sin[samples, rows][:, None], rope=True)[:, :, 0]  # [n, H, hd]
    k = project_keys(math, hidden, cos, sin, rope=True)[samples]  # [n, KVH, L, hd]
    k = k.repeat_interleave(math.num_heads // math.num_kv_heads, dim=1)  # [n, H, L, hd]
    scores = torch.einsum("nhd,nhld->nhl", q.float(), k.float()) * math.scaling
    future = torch.arange(hidden.shape[1])[None, :] > rows[:, None]  # [n, L]
    probs = torch.softmax(scores.masked_fill(future[:, None], float("-inf")), dim=-1)  # [n, H, L]
    return (probs[:, :heads] * masks).sum(dim=-1).mean(dim=-1)


def sincos_positions(rows: int, cols: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position table ``[rows * cols, dim]`` (half the channels for the row, half for the column)."""
    quarter = dim // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # [dim / 4]
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                              indexing="ij")
    angles_row = row.reshape(-1, 1) * frequencies  # [rows * cols, dim / 4]
    angles_col = col.reshape(-1, 1) * frequencies
    table = torch.cat([angles_row.sin(), angles_row.cos(), angles_col.sin(), angles_col.cos()], dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def initialise_positions(model, scale: float) -> None:
    """Start a CLIP-style vision tower's learned absolute position table from 2-D sine-cosine values at
    ``scale`` (the stock initialiser's 0.02 makes positions ~25x weaker than pixel content: the tower then
    needs thousands of steps to tell cells apart). Towers without an absolute table are left alone."""
    embeddings = getattr(getattr(getattr(model, "model", model), "vision_tower", None), "embeddings", None)
    table = getattr(embeddings, "position_embedding", None)
    if table is None:
        return
    side = int(round((table.num_embeddings - 1) ** 0.5))  # CLS first, then a side x side patch grid
    with torch.no_grad():
        table.weight[1:] = scale * sincos_positions(side, side, table.embedding_dim)


def sample_stream(recipe: Recipe, video: bool):
    """An endless, seeded stream of training samples (split=train, disjoint from the test split)."""
    if video:
        dataset = SyntheticVideoQA(limit=10**9, seed=recipe.seed, split="train", frames=recipe.video_frames,
                                   frame_size=recipe.video_frame_size, tasks=recipe.video_tasks)
    else:
        dataset = SyntheticImageQA(limit=10**9, seed=recipe.seed, split="train", image_size=recipe.image_size,
                                   tasks=recipe.image_tasks)
    index = 0
    while True:
        yield dataset[index]
        index += 1


def evaluate(vlm, dataset, limit: int | None = None) -> dict[str, float]:
    """Greedy accuracy (%) of the unpruned model on a dataset, through the same path the runner uses: overall
    (``"all"``) and per task."""
    hits: dict[str, list[float]] = {}
    eos = vlm.processor.tokenizer.eos_token_id
    vlm.model.eval()
    with torch.no_grad():
        for index in range(len(dataset) if limit is None else min(limit, len(dataset))):
            sample = dataset[index]
            inputs = vlm.prepare(sample)
            output = vlm.model.generate(**inputs, max_new_tokens=dataset.max_new_tokens, do_sample=False,
                                        eos_token_id=eos, pad_token_id=eos)
            prediction = vlm.decode(output[0, inputs["input_ids"].shape[1]:])
            score = float(dataset.scorer.score(prediction, sample))
            for key in ("all", sample.meta["task"]):
                hits.setdefault(key, []).append(score)
    return {key: round(100.0 * sum(values) / len(values), 1) for key, values in hits.items()}


def held_out(recipe: Recipe, video: bool, n: int):
    if video:
        return SyntheticVideoQA(limit=n, seed=recipe.seed, split="test", frames=recipe.video_frames,
                                frame_size=recipe.video_frame_size, tasks=recipe.video_tasks)
    return SyntheticImageQA(limit=n, seed=recipe.seed, split="test", image_size=recipe.image_size,
                            tasks=recipe.image_tasks)


def train(name: str, out: Path, steps: int | None = None, seed: int | None = None, log_every: int = 50,
          evaluate_after: bool = True) -> dict:
    """Train ``name`` with its recipe (``steps`` / ``seed`` override it), write the checkpoint to ``out`` and
    return the training record (also written as ``training.json``). Deterministic algorithms are switched on
    for the run and restored afterwards."""
    deterministic, warn_only = (torch.are_deterministic_algorithms_enabled(),
                                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(name, out, steps, seed, log_every, evaluate_after)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(name: str, out: Path, steps: int | None, seed: int | None, log_every: int, evaluate_after: bool) -> dict:
    if name not in RECIPES:
        raise ValueError(f"no training recipe for {name!r}; trainable models: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    if steps is not None:
        recipe = Recipe(**{**recipe.__dict__, "steps": steps})
    if seed is not None:
        recipe = Recipe(**{**recipe.__dict__, "seed": seed})
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    spec = model_spec(name)
    adapter = adapter_named(spec.family)
    from ..base import VLM

    model = adapter.build_random(spec.random_config(), torch.float32, "sdpa", seed=recipe.seed)
    initialise_positions(model, recipe.position_scale)
    vlm = VLM(name=name, model=model, processor=spec.random_processor(), adapter=adapter)
    heads = AuxiliaryHeads(adapter.text_config(model).hidden_size)
    key_probe = KeyProbe(adapter.text_config(model).hidden_size)
    look_heads_aux = AuxiliaryHeads(adapter.text_config(model).hidden_size)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters(), *key_probe.parameters(),
                                   *look_heads_aux.parameters()], lr=recipe.learning_rate,
                                  weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    captured = {}
    capture = adapter.text_model(model).register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs.get("inputs_embeds")), with_kwargs=True)
    look_layer = adapter.text_model(model).layers[recipe.look_layer]
    capture_look = capture_layer_input(look_layer, captured, "look")
    read_layer = adapter.text_model(model).layers[recipe.read_layer]
    capture_read = capture_layer_input(read_layer, captured, "read")
    capture_key = capture_layer_input(adapter.text_model(model).layers[recipe.read_layer + 1], captured, "key")
    visual_ids = placeholder_ids(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    images, videos = sample_stream(recipe, False), sample_stream(recipe, True) if recipe.video_every else None
    turn_rng = random.Random(recipe.seed)
    model.train()
    started, history = time.perf_counter(), []
    for step in range(recipe.steps):
        use_video = bool(recipe.video_every) and step % recipe.video_every == recipe.video_every - 1
        stream = videos if use_video else images
        samples = [next(stream) for _ in range(recipe.video_batch_size if use_video else recipe.batch_size)]
        batch, lookups = collate(vlm, samples, 0 if use_video else recipe.extra_turns, turn_rng, recipe.image_tasks)
        parts = {"lm": model(**batch).loss}
        if recipe.auxiliary_weight:
            visual = torch.isin(batch["input_ids"], visual_ids)  # [B, L]
            labels = batch_token_labels(vlm, samples, batch)  # [n_visual, 6]
            parts["aux"] = recipe.auxiliary_weight * heads.loss(captured["embeds"][visual], labels)
            if recipe.look_auxiliary:  # the visual rows the look heads read still carry what they show
                parts["aux"] = parts["aux"] + recipe.auxiliary_weight * look_heads_aux.loss(captured["look"][0][visual], labels)
        if recipe.look_weight:
            masks = evidence_masks(vlm, samples, batch, lookups, recipe.look_heads)  # [n_lookups, heads, L]
            supervised = masks.flatten(1).any(dim=1)
            mass = evidence_attention(adapter.attention_math(look_layer), *captured["look"],
                                      [lk for lk, keep in zip(lookups, supervised) if keep], masks[supervised], recipe.look_heads)
            parts["look"] = recipe.look_weight * -torch.log(mass + 1e-4).mean()
        masks, key_targets = key_word_masks(vlm, batch, lookups, recipe.look_heads)  # [n, heads, L], [n, 2]
        if recipe.read_weight:
            supervised = masks.flatten(1).any(dim=1)
            mass = evidence_attention(adapter.attention_math(read_layer), *captured["read"],
                                      [lk for lk, keep in zip(lookups, supervised) if keep], masks[supervised],
                                      recipe.look_heads)
            parts["read"] = recipe.read_weight * -torch.log(mass + 1e-4).mean()
        if recipe.key_weight:
            parts["key"] = recipe.key_weight * key_probe.loss(captured["key"][0], lookups, key_targets)
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append({name: float(value.detach()) for name, value in parts.items()})
        if log_every and (step + 1) % log_every == 0:
            recent = history[-log_every:]
            means = {name: sum(h.get(name, 0.0) for h in recent) / len(recent) for name in parts}
            print(f"step {step + 1}/{recipe.steps}  loss {sum(means.values()):.4f}  ("
                  + "  ".join(f"{name} {value:.3f}" for name, value in means.items())
                  + f")  {time.perf_counter() - started:.0f}s", flush=True)
    seconds = time.perf_counter() - started
    capture.remove()
    capture_look.remove()
    capture_read.remove()
    capture_key.remove()
    model.eval()
    result = {"name": name, "steps": recipe.steps, "seed": recipe.seed, "train_seconds": round(seconds, 1),
              "final_loss": round(sum(sum(h.values()) for h in history[-50:]) / max(1, len(history[-50:])), 4), "recipe": recipe.__dict__}
    if evaluate_after:
        result["heldout_image_accuracy"] = evaluate(vlm, held_out(recipe, False, recipe.eval_samples))
        if recipe.video_every:
            result["heldout_video_accuracy"] = evaluate(vlm, held_out(recipe, True, recipe.eval_samples))
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
                     f"{recipe['video_frames']} frames of {recipe['video_frame_size']} px; one batch of "
                     f"{recipe['video_batch_size']} videos in every {recipe['video_every']}")
    lines += [
        "",
        "## Training",
        f"- {result['steps']} steps x batch {recipe['batch_size']}, AdamW lr {recipe['learning_rate']} (warm-up "
        f"{recipe['warmup']}, cosine), seed {result['seed']}; {result['train_seconds']} s on this machine's CPU",
        f"- objective: answer cross-entropy (+{recipe['extra_turns']} extra question turns per image); auxiliary "
        f"per-token colour / shape / cell / motion / centre heads on the visual tokens entering the decoder and the "
        f"look layer (weight {recipe['auxiliary_weight']}); "
        f"{recipe['look_heads']} heads of decoder layer {recipe['read_layer']} guided to the question's key words "
        f"(weight {recipe['read_weight']}) and a key probe on that layer's output (weight {recipe['key_weight']}); "
        f"{recipe['look_heads']} heads of decoder layer {recipe['look_layer']} guided to the evidence objects "
        f"(weight {recipe['look_weight']}). Heads and probes are training-only, not part of the checkpoint",
        f"- final training loss {result['final_loss']}",
        f"- reproduce: `python -m tokenprune.models.zoo.train {result['name']}`",
        "",
        "## Held-out accuracy (split `test`, unpruned, greedy)",
    ]
    for key, label in (("heldout_image_accuracy", "synthetic image QA"), ("heldout_video_accuracy", "synthetic video QA")):
        if key in result:
            per_task = ", ".join(f"{task} {value}%" for task, value in result[key].items() if task != "all")
            lines.append(f"- {label}: **{result[key]['all']}%** on {recipe['eval_samples']} samples ({per_task})")
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
