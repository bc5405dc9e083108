"""EgoSchema subset (500 questions about 3-minute egocentric videos, with public answers): five options,
answered with the option's letter; accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import DatasetError, register_dataset
from ..sample import Sample
from ..scorers import MultipleChoice
from .hub import VideoBenchmark, find_video, strip_letter

LETTERS = "ABCDE"
INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


@register_dataset("egoschema")
@dataclass
class EgoSchema(VideoBenchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/egoschema", "lmms-eval/egoschema"])
    split: str = "test"
    max_new_tokens: int = 16
    config: str | None = "Subset"

    columns = ("question_idx", "question", "video_idx", "option", "answer")
    id_column = "question_idx"
    download = ("the lmms-lab/egoschema dataset (now lmms-eval/egoschema), config Subset, and its videos: "
                "unzip the videos_chunked_*.zip files into video_dir, giving <video_idx>.mp4")
    generation_source = 'lmms_eval/tasks/egoschema/_default_template_yaml'

    def make_scorer(self):
        return MultipleChoice()

    def load(self):
        table = super().load()
        if any(answer is None or str(answer).strip() == "" for answer in table["answer"]):
            raise DatasetError(f"{self.name}: config {self.config!r} has rows without an answer (EgoSchema publishes "
                               f"answers for the 500-question Subset only; the full set is scored by its server)")
        return table

    def build(self, row: dict, sample_id: str) -> Sample:
        options = [str(option) for option in row["option"]]
        question = "\n".join([row["question"]] + options) + INSTRUCTION
        video = find_video(self.video_dir, [f"{row['video_idx']}.mp4", f"{row['video_idx']}.MP4",
                                            f"videos/{row['video_idx']}.mp4"])
        return Sample(id=sample_id, question=question, video=video, answer=LETTERS[int(row["answer"])],
                      choices=[strip_letter(option) for option in options], meta={"video_idx": row["video_idx"]})
