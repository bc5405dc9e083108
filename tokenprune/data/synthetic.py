"""Embedded synthetic datasets, generated deterministically from a seed (no download).

Image QA: coloured shapes on a 3 x 3 grid of cells; the answer depends on a small region (the colour or
shape of the object in one named cell), on counting (how many objects of a colour), or on a relation
(is one object left of another). Video QA: questions that need more than one frame (the direction an
object moves; which of two objects appeared first).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .base import Dataset, check_count, deprecated_count, register_dataset
from .sample import Sample, VideoFrames
from .scorers import ExactMatch

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "cyan": (40, 210, 220),
}
SHAPES = ("square", "circle", "triangle", "cross")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
NUMBERS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
IMAGE_TASKS = ("colour_at", "shape_at", "count", "left_of")
# The default mix (what the tiny models are trained on): a lookup by named position and a relation between two
# objects named by colour. shape_at and count stay available but are left out: the tiny vision towers do not
# learn to tell shapes 2-3 patches wide apart within their training budget, and counting needs attention that
# is not normalised over the matching tokens.
DEFAULT_IMAGE_TASKS = ("colour_at", "left_of")
VIDEO_TASKS = ("direction", "first")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (70, 70, 70)  # mean background colour


def background(width: int, height: int) -> Image.Image:
    """A dark background whose red channel rises left to right and green channel top to bottom (30..110),
    like the uneven backgrounds of real photographs: every patch shows where it lies, so a vision tower
    without absolute position embeddings (Qwen2.5-VL's windowed, rotary ViT) can still tell cells apart.
    Kept darker and less saturated than every object colour."""
    x = np.linspace(30, 110, width, dtype=np.float32)[None, :].repeat(height, 0)  # [H, W]
    y = np.linspace(30, 110, height, dtype=np.float32)[:, None].repeat(width, 1)
    blue = np.full((height, width), 70, dtype=np.float32)
    return Image.fromarray(np.stack([x, y, blue], axis=-1).round().astype(np.uint8), "RGB")


def cell_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "centre"
    if row == 1:
        return f"middle {COLUMNS[col]}"
    return f"{ROWS[row]} {COLUMNS[col]}"


def check_limit(owner: str, limit) -> None:
    if limit is None:
        raise ValueError(f"{owner}.limit must be an integer >= 0 (how many samples to generate: the synthetic stream "
                         "has no end), got null")
    check_count(owner, "limit", limit, allow_none=False)


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{split}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # cross
        w, h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=colour)
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=colour)


@dataclass
class SceneObject:
    row: int
    col: int
    colour: str
    shape: str


def render_scene(objects: list[SceneObject], size: int, rng: random.Random, jitter: bool = True):
    """The scene as an image, and each object's box in [0, 1] coordinates: ``[x0, y0, x1, y1, colour, shape]``."""
    image = background(size, size)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    boxes = []
    for obj in objects:
        scale = rng.uniform(0.6, 0.85) if jitter else 0.7
        extent = cell * scale
        slack = cell - extent
        x0 = obj.col * cell + (rng.uniform(0, slack) if jitter else slack / 2)
        y0 = obj.row * cell + (rng.uniform(0, slack) if jitter else slack / 2)
        draw_shape(draw, obj.shape, (x0, y0, x0 + extent, y0 + extent), COLOURS[obj.colour])
        boxes.append(_box(x0, y0, extent, size, obj.colour, obj.shape))
    return image, boxes


def _box(x0: float, y0: float, extent: float, size: int, colour: str, shape: str) -> list:
    return [round(x0 / size, 4), round(y0 / size, 4), round((x0 + extent) / size, 4), round((y0 + extent) / size, 4),
            colour, shape]


def box_cell(box) -> tuple[int, int]:
    """Grid cell (row, column) of a box ``[x0, y0, x1, y1, colour, shape]`` in [0, 1] coordinates."""
    x0, y0, x1, y1 = box[:4]
    return min(2, int(3 * (y0 + y1) / 2)), min(2, int(3 * (x0 + x1) / 2))


def ask_about(boxes: list, task: str, rng: random.Random):
    """One more question of ``task`` about a rendered scene (its ``meta["objects"]`` boxes): ``(question, answer,
    evidence)`` in the dataset's formats, or None when the scene cannot answer it unambiguously (left-of needs
    two objects of unique colours in different columns). Used to train on several questions per image."""
    if task in ("colour_at", "shape_at"):
        index = rng.randrange(len(boxes))
        row, col = box_cell(boxes[index])
        attribute = "colour" if task == "colour_at" else "shape"
        answer = boxes[index][4] if task == "colour_at" else boxes[index][5]
        return f"what {attribute} is the object at the {cell_name(row, col)} ?", answer, [[index]]
    if task == "count":
        present = [box[4] for box in boxes]
        colour = rng.choice(present) if rng.random() < 0.5 else rng.choice(list(COLOURS))
        matching = [i for i, box in enumerate(boxes) if box[4] == colour]
        return f"how many {colour} objects are there ?", NUMBERS[len(matching)], [matching]
    if task == "left_of":
        colours = [box[4] for box in boxes]
        unique = [i for i, c in enumerate(colours) if colours.count(c) == 1]
        pairs = [(i, j) for i in unique for j in unique if box_cell(boxes[i])[1] != box_cell(boxes[j])[1]]
        if not pairs:
            return None
        i, j = rng.choice(pairs)
        answer = "yes" if box_cell(boxes[i])[1] < box_cell(boxes[j])[1] else "no"
        return f"is the {colours[i]} object left of the {colours[j]} object ?", answer, [[i], [j]]
    raise ValueError(f"unknown image task {task!r}; expected one of {list(IMAGE_TASKS)}")


@register_dataset("synthetic_image")
@dataclass
class SyntheticImageQA(Dataset):
    """Questions about coloured shapes on a 3 x 3 grid; one-word answers; exact-match scoring.

    ``limit``: how many samples (the stream from ``seed`` has no end); ``seed``: which ones.
    """

    limit: int = 48
    seed: int = 0
    split: str = "test"  # "train" and "test" draw disjoint streams from the same seed
    image_size: int = 168
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_IMAGE_TASKS))
    min_objects: int = 3
    max_objects: int = 6
    max_new_tokens: int = 4
    n_samples: int | None = None  # deprecated: limit

    def __post_init__(self):
        self.limit, self.n_samples = deprecated_count(self.name, "n_samples", self.n_samples, self.limit), None
        check_limit(self.name, self.limit)
        check_count(self.name, "image_size", self.image_size, allow_none=False, minimum=28)
        self.tasks = list(self.tasks)
        unknown = sorted(set(self.tasks) - set(IMAGE_TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"{self.name}.tasks must be a non-empty subset of {list(IMAGE_TASKS)}, got {self.tasks}")
        if self.split not in ("train", "test"):
            raise ValueError(f"{self.name}.split must be one of ['train', 'test'], got {self.split!r}")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise ValueError(f"{self.name}: need 1 <= min_objects <= max_objects <= 9, got {self.min_objects}, {self.max_objects}")
        self.scorer = ExactMatch(first_word=True)

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.limit:
            raise IndexError(index)
        rng = sample_rng(self.seed, self.split, index)
        task = self.tasks[index % len(self.tasks)]
        cells = rng.sample(range(9), rng.randint(self.min_objects, self.max_objects))
        objects = [SceneObject(c // 3, c % 3, rng.choice(list(COLOURS)), rng.choice(SHAPES)) for c in cells]
        if task == "left_of":
            objects = self._distinct_colours(objects, rng)
        question, answer, evidence = getattr(self, f"_ask_{task}")(objects, rng)
        image, boxes = render_scene(objects, self.image_size, rng)
        # meta["evidence"]: the objects the answer depends on, as groups of indices into meta["objects"] (one group
        # per thing to look up: [[i]] for the object at a cell, [[a], [b]] for "a left of b", [[all of a colour]])
        return Sample(id=f"{self.split}-{self.seed}-{index}", question=question, images=[image], answer=answer,
                      meta={"task": task, "category": task, "objects": boxes, "evidence": evidence})

    def sample_id(self, index: int) -> str:
        return f"{self.split}-{self.seed}-{index}"

    @staticmethod
    def _distinct_colours(objects, rng):
        colours = rng.sample(list(COLOURS), len(objects))
        return [SceneObject(o.row, o.col, c, o.shape) for o, c in zip(objects, colours)]

    @staticmethod
    def _ask_colour_at(objects, rng):
        index = rng.randrange(len(objects))
        target = objects[index]
        return f"what colour is the object at the {cell_name(target.row, target.col)} ?", target.colour, [[index]]

    @staticmethod
    def _ask_shape_at(objects, rng):
        index = rng.randrange(len(objects))
        target = objects[index]
        return f"what shape is the object at the {cell_name(target.row, target.col)} ?", target.shape, [[index]]

    @staticmethod
    def _ask_count(objects, rng):
        """Recolours the scene so that the asked colour appears 0, 1, 2 or 3 times, uniformly."""
        colour = rng.choice(list(COLOURS))
        count = rng.randint(0, min(3, len(objects)))
        chosen = set(rng.sample(range(len(objects)), count))
        others = [c for c in COLOURS if c != colour]
        for i, obj in enumerate(objects):
            obj.colour = colour if i in chosen else rng.choice(others)
        return f"how many {colour} objects are there ?", NUMBERS[count], [sorted(chosen)]

    @staticmethod
    def _ask_left_of(objects, rng):
        candidates = [(i, j) for i, a in enumerate(objects) for j, b in enumerate(objects) if a.col != b.col]
        i, j = rng.choice(candidates) if candidates else (0, len(objects) - 1)  # one column: "no" both ways
        a, b = objects[i], objects[j]
        answer = "yes" if a.col < b.col else "no"
        return f"is the {a.colour} object left of the {b.colour} object ?", answer, [[i], [j]]


@register_dataset("synthetic_video")
@dataclass
class SyntheticVideoQA(Dataset):
    """Questions that need several frames: motion direction, order of appearance; one-word answers.

    ``format=frames`` yields decoded frames; ``format=mp4`` writes each video once to ``cache_dir`` (real
    files, decoded by the model's video reader). ``limit``: how many samples; ``seed``: which ones.
    """

    limit: int = 24
    seed: int = 0
    split: str = "test"
    frames: int = 8
    frame_size: int = 112  # multiple of 28
    fps: float = 4.0
    tasks: list[str] = field(default_factory=lambda: list(VIDEO_TASKS))
    format: str = "frames"
    cache_dir: str | None = None
    max_new_tokens: int = 4
    n_samples: int | None = None  # deprecated: limit

    def __post_init__(self):
        self.limit, self.n_samples = deprecated_count(self.name, "n_samples", self.n_samples, self.limit), None
        check_limit(self.name, self.limit)
        check_count(self.name, "frames", self.frames, allow_none=False, minimum=2)
        if self.frame_size % 28:
            raise ValueError(f"{self.name}.frame_size must be a multiple of 28, got {self.frame_size}")
        self.tasks = list(self.tasks)
        unknown = sorted(set(self.tasks) - set(VIDEO_TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"{self.name}.tasks must be a non-empty subset of {list(VIDEO_TASKS)}, got {self.tasks}")
        if self.format not in ("frames", "mp4"):
            raise ValueError(f"{self.name}.format must be one of ['frames', 'mp4'], got {self.format!r}")
        if self.split not in ("train", "test"):
            raise ValueError(f"{self.name}.split must be one of ['train', 'test'], got {self.split!r}")
        self.scorer = ExactMatch(first_word=True)

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.limit:
            raise IndexError(index)
        rng = sample_rng(self.seed, f"video-{self.split}", index)
        task = self.tasks[index % len(self.tasks)]
        frames, boxes, question, answer = getattr(self, f"_make_{task}")(rng)
        video = np.stack([np.asarray(f) for f in frames])  # [n, H, W, 3] uint8
        sample_id = f"video-{self.split}-{self.seed}-{index}"
        if self.format == "mp4":
            source = write_mp4(video, self._cache_path(sample_id), self.fps)
        else:
            source = VideoFrames(frames=np.ascontiguousarray(video.transpose(0, 3, 1, 2)), fps=self.fps,
                                 frame_indices=list(range(self.frames)), total_frames=self.frames)
        # meta["evidence"]: the object the answer is about (index 0 of every frame's boxes: the moving object, or
        # the object that appeared first), in the image tasks' group format; a direction compares where the
        # object is at the start of the video with where it is at the end (meta["evidence_when"])
        meta = {"task": task, "category": task, "frame_objects": boxes, "evidence": [[0]]}
        if task == "direction":
            meta.update(evidence=[[0], [0]], evidence_when=["start", "end"])
        return Sample(id=sample_id, question=question, video=source, answer=answer, meta=meta)

    def sample_id(self, index: int) -> str:
        return f"video-{self.split}-{self.seed}-{index}"

    def _cache_path(self, sample_id: str) -> Path:
        root = Path(self.cache_dir) if self.cache_dir else Path.home() / ".cache" / "tokenprune" / "synthetic_video"
        key = f"{self.frames}x{self.frame_size}@{self.fps}"
        return root / key / f"{sample_id}.mp4"

    def _make_direction(self, rng):
        size, n = self.frame_size, self.frames
        direction = rng.choice(DIRECTIONS)
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        extent = size * 0.22
        travel = size - extent - 8
        fixed = rng.uniform(4, size - extent - 4)
        frames, boxes = [], []
        for t in range(n):
            progress = 4 + travel * t / (n - 1)
            along = progress if direction in ("right", "down") else size - extent - progress
            x0, y0 = (along, fixed) if direction in ("left", "right") else (fixed, along)
            image = background(size, size)
            draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + extent, y0 + extent), COLOURS[colour])
            frames.append(image)
            boxes.append([_box(x0, y0, extent, size, colour, shape)])
        return frames, boxes, f"which direction does the {colour} {shape} move ?", direction

    def _make_first(self, rng):
        size, n = self.frame_size, self.frames
        first, second = rng.sample(list(COLOURS), 2)
        t_first = rng.randint(0, n // 2 - 1)
        t_second = rng.randint(t_first + 2, n - 1) if t_first + 2 <= n - 1 else n - 1
        cells = rng.sample(range(9), 2)
        shapes = rng.choice(SHAPES), rng.choice(SHAPES)
        placements = [SceneObject(cells[0] // 3, cells[0] % 3, first, shapes[0]),
                      SceneObject(cells[1] // 3, cells[1] % 3, second, shapes[1])]
        frames, boxes = [], []
        for t in range(n):
            visible = [p for p, start in zip(placements, (t_first, t_second)) if t >= start]
            image, frame_boxes = render_scene(visible, size, random.Random(0), jitter=False)
            frames.append(image)
            boxes.append(frame_boxes)
        question = f"which colour appeared first , {first} or {second} ?" if rng.random() < 0.5 else \
            f"which colour appeared first , {second} or {first} ?"
        return frames, boxes, question, first


def write_mp4(video: np.ndarray, path: Path, fps: float) -> str:
    """Encode ``video`` ``[n, H, W, 3]`` uint8 as H.264 mp4 (written once, atomically)."""
    import av

    path = Path(path)
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.replace(path)
    return str(path)
