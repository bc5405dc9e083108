"""Video-MME (2,700 questions about 900 short / medium / long videos): four options, answered with the
option's letter; accuracy overall and per duration, domain and task type. No subtitles."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import register_dataset
from ..sample import Sample
from ..scorers import MultipleChoice
from .hub import VideoBenchmark, find_video, strip_letter

# lmms-eval's default prompt (its wording mentions subtitles even in the variant without them)
HEADER = ("Select the best answer to the following multiple-choice question based on the video and the subtitles. "
          "Respond with only the letter (A, B, C, or D) of the correct option.")
INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


@register_dataset("videomme")
@dataclass
class VideoMME(VideoBenchmark):
    hub_names: list[str] = field(default_factory=lambda: ["lmms-lab/Video-MME", "lmms-eval/Video-MME"])
    split: str = "test"
    max_new_tokens: int = 16
    config: str | None = "videomme"

    columns = ("question_id", "videoID", "duration", "question", "options", "answer")
    id_column = "question_id"
    download = ("the lmms-lab/Video-MME dataset (now lmms-eval/Video-MME) and its videos: unzip "
                "videos_chunked_*.zip into video_dir, giving <videoID>.mp4")
    generation_source = 'lmms_eval/tasks/videomme/videomme.yaml'

    def make_scorer(self):
        return MultipleChoice(breakdown=("duration", "domain", "task_type"))

    def build(self, row: dict, sample_id: str) -> Sample:
        options = [str(option) for option in row["options"]]
        question = "\n".join([HEADER, row["question"], *options, INSTRUCTION])
        stem = row["videoID"]
        video = find_video(self.video_dir, [f"{stem}.mp4", f"{stem}.MP4", f"{stem}.mkv", f"data/{stem}.mp4",
                                            f"data/{stem}.MP4", f"data/{stem}.mkv"])
        return Sample(id=sample_id, question=question, video=video, answer=str(row["answer"]).strip(),
                      choices=[strip_letter(option) for option in options],
                      meta={"duration": row["duration"], "domain": row.get("domain"), "task_type": row.get("task_type"),
                            "videoID": stem})
