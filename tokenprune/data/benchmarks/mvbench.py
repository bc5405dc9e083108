"""MVBench (20 video tasks x 200 questions): multiple choice over 2-5 candidates; accuracy overall and per task.

Each task is one config of ``OpenGVLab/MVBench`` (revision ``video``); its videos come from the archives in
the repository's ``video/`` folder, unpacked into ``video_dir`` (one sub-folder per source dataset).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from ..base import DatasetError, register_dataset
from ..sample import Sample
from ..scorers import MultipleChoice
from .hub import VideoBenchmark, find_video, load_split, prepare

# Where each task's videos are, under video_dir (the layout of the unpacked archives, as lmms-eval reads it).
TASK_FOLDERS = {
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_antonym": "ssv2_video_mp4",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_segment",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video_segment",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "counterfactual_inference": "clevrer/video_validation",
}
TASKS = tuple(TASK_FOLDERS)
INSTRUCTION = "Only give the best option.\n"


def prompt(question: str, candidates: list[str]) -> str:
    options = "".join(f"({string.ascii_uppercase[i]}) {c}\n" for i, c in enumerate(candidates))
    return f"Question:{question}\nOption:\n{options}{INSTRUCTION}"


@register_dataset("mvbench")
@dataclass
class MVBench(VideoBenchmark):
    hub_names: list[str] = field(default_factory=lambda: ["OpenGVLab/MVBench"])
    split: str = "train"
    max_new_tokens: int = 16
    revision: str | None = "video"  # the hub revision with the videos converted to mp4
    tasks: list[str] = field(default_factory=lambda: list(TASKS))

    columns = ("video", "question", "candidates", "answer")
    download = ("the OpenGVLab/MVBench dataset (revision video) and its videos: unzip the archives of its video/ "
                "folder into video_dir (star/, clevrer/, perception/, ...)")
    generation_source = 'lmms_eval/tasks/mvbench/_default_template_yaml'

    def check(self) -> None:
        self.tasks = list(self.tasks)
        unknown = [t for t in self.tasks if t not in TASK_FOLDERS]
        if unknown or not self.tasks:
            raise ValueError(f"{self.name}.tasks must be a non-empty subset of {list(TASKS)}; unknown: {unknown}")
        super().check()

    def make_scorer(self):
        return MultipleChoice(breakdown=("task_type",))

    def load(self):
        """The tasks' tables, one after the other, with ``task_type`` and ``task_row`` columns added."""
        import datasets

        features = datasets.Features({"video": datasets.Value("string"), "question": datasets.Value("string"),
                                      "candidates": datasets.List(datasets.Value("string")),
                                      "answer": datasets.Value("string")})
        parts = []
        for task in self.tasks:
            table, source = load_split(self.name, self.path, self.hub_names, task, self.split, self.revision,
                                       config_required=True)
            table = prepare(self.name, table, f"{source} (task {task})", self.columns)
            table = table.select_columns(list(self.columns)).cast(features)
            parts.append(table.add_column("task_type", [task] * len(table)).add_column("task_row", list(range(len(table)))))
        return datasets.concatenate_datasets(parts)

    def ids(self, table, rows: list[int]) -> list[str]:
        tasks, task_rows = list(table["task_type"]), list(table["task_row"])
        return [f"{tasks[row]}/{task_rows[row]}" for row in rows]

    def build(self, row: dict, sample_id: str) -> Sample:
        candidates = list(row["candidates"])
        if row["answer"] not in candidates:
            raise DatasetError(f"{self.name}: the answer {row['answer']!r} of {sample_id} is not one of its "
                               f"candidates {candidates}")
        folder = TASK_FOLDERS[row["task_type"]]
        video = find_video(self.video_dir, [f"{folder}/{row['video']}", row["video"]])
        return Sample(id=sample_id, question=prompt(row["question"], candidates), video=video,
                      answer=string.ascii_uppercase[candidates.index(row["answer"])], choices=candidates,
                      meta={"task_type": row["task_type"]})
