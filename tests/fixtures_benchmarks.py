"""Tiny local copies of the benchmarks in their real hub format, for tests (nothing downloads).

Each builder writes what ``huggingface-cli download --repo-type dataset <name>`` leaves on disk: data files
in the repository's layout (parquet with Hugging Face image features, or MVBench's json files) and a README
whose YAML header declares the configs and splits; video benchmarks also get a folder of short mp4 files in
the layout of their unpacked archives. ``build(name, root)`` returns the dataset overrides
(``{"path": ..., "video_dir": ...}``) that point tokenprune at the copy.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from tokenprune.data.synthetic import write_mp4

COLOURS = [(200, 30, 30), (30, 160, 60), (30, 60, 200), (220, 200, 40), (140, 50, 180), (240, 130, 20)]


def png(index: int, size: int = 32) -> dict:
    """An encoded image as ``datasets`` stores it ({"bytes", "path"})."""
    image = PILImage.new("RGB", (size, size), COLOURS[index % len(COLOURS)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": f"{index}.png"}


def mp4(path: Path, seed: int) -> str:
    """A 2-second, 8-frame, 112 x 112 mp4 (a square moving right)."""
    frames = np.zeros((8, 112, 112, 3), dtype=np.uint8)
    for t in range(8):
        frames[t, 40:72, 8 + 10 * t: 40 + 10 * t] = COLOURS[seed % len(COLOURS)]
    return write_mp4(frames, path, fps=4.0)


def readme(configs: dict[str, dict[str, str]]) -> str:
    """A dataset card header declaring ``{config: {split: file pattern}}``."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    return "\n".join(lines + ["---", "", "Test copy written by tests/fixtures_benchmarks.py.", ""])


def write_table(root: Path, relative: str, rows: dict, features: dict) -> None:
    file = root / relative
    file.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=Features(features)).to_parquet(str(file))


def write_card(root: Path, configs: dict[str, dict[str, str]]) -> None:
    (root / "README.md").write_text(readme(configs))


S = Value("string")


# ---------------------------------------------------------------------------------------------------------
# Image benchmarks
# ---------------------------------------------------------------------------------------------------------
def textvqa(root: Path) -> dict:
    answers = [["nokia"] * 7 + ["nokia phone"] * 3, ["2"] * 2 + ["two"] * 2 + ["3"] * 6, ["stop"] * 10]
    rows = {
        "image_id": ["a1", "b2", "c3"], "question_id": [34602, 34603, 34604],
        "question": ["what brand is the phone?", "how many signs are there?", "what does the sign say?"],
        "question_tokens": [["what", "brand"], ["how", "many"], ["what", "does"]],
        "image": [png(i) for i in range(3)], "image_width": [32] * 3, "image_height": [32] * 3,
        "flickr_original_url": [""] * 3, "flickr_300k_url": [""] * 3, "answers": answers,
        "image_classes": [["phone"], ["sign"], ["sign"]], "set_name": ["val"] * 3,
        "ocr_tokens": [["nokia"], ["2"], ["stop"]],
    }
    features = {"image_id": S, "question_id": Value("int64"), "question": S, "question_tokens": List(S),
                "image": Image(), "image_width": Value("int64"), "image_height": Value("int64"),
                "flickr_original_url": S, "flickr_300k_url": S, "answers": List(S), "image_classes": List(S),
                "set_name": S, "ocr_tokens": List(S)}
    write_table(root, "data/validation-00000-of-00001.parquet", rows, features)
    write_card(root, {"default": {"validation": "data/validation-*"}})
    return {"path": str(root)}


def mme(root: Path) -> dict:
    questions = [("existence/000000006040.jpg", "Is there a train in this image?", "Yes", "existence"),
                 ("existence/000000006040.jpg", "Is there a bed in this image?", "No", "existence"),
                 ("count/000000040.jpg", "Are there two dogs in the image?", "Yes", "count"),
                 ("count/000000040.jpg", "Are there three dogs in the image?", "No", "count"),
                 ("code_reasoning/0020.png", "Is the output of the code 5?", "Yes", "code_reasoning"),
                 ("code_reasoning/0020.png", "Is the output of the code 7?", "No", "code_reasoning")]
    rows = {"question_id": [q[0] for q in questions], "image": [png(i // 2) for i in range(6)],
            "question": [q[1] + " Please answer yes or no." for q in questions],
            "answer": [q[2] for q in questions], "category": [q[3] for q in questions]}
    features = {"question_id": S, "image": Image(), "question": S, "answer": S, "category": S}
    write_table(root, "data/test-00000-of-00001.parquet", rows, features)
    write_card(root, {"default": {"test": "data/test-*"}})
    return {"path": str(root)}


def pope(root: Path) -> dict:
    categories = ["adversarial", "adversarial", "popular", "popular", "random", "random"]
    rows = {"id": [str(i) for i in range(6)], "question_id": ["1", "2", "1", "2", "1", "2"],
            "question": ["Is there a dog in the image?", "Is there a car in the image?"] * 3,
            "answer": ["yes", "no"] * 3, "image_source": [f"COCO_val2014_{i:012d}" for i in range(6)],
            "image": [png(i) for i in range(6)], "category": categories}
    features = {"id": S, "question_id": S, "question": S, "answer": S, "image_source": S, "image": Image(),
                "category": S}
    write_table(root, "data/test-00000-of-00001.parquet", rows, features)
    write_card(root, {"default": {"test": "data/test-*"}})
    return {"path": str(root)}


def gqa(root: Path) -> dict:
    types = Features({"structural": S, "semantic": S, "detailed": S})
    rows = {"id": ["201307251", "201640614", "20968379"], "imageId": ["n15740", "n15740", "n288870"],
            "question": ["Is it overcast?", "Who is wearing the dress?", "Does the utensil on top of the table look clean?"],
            "answer": ["no", "woman", "yes"],
            "fullAnswer": ["No, it is clear.", "The woman is wearing a dress.", "Yes, the fork is clean."],
            "isBalanced": [True, True, True],
            "types": [{"structural": "verify", "semantic": "global", "detailed": "weatherVerify"},
                      {"structural": "query", "semantic": "rel", "detailed": "relS"},
                      {"structural": "verify", "semantic": "attr", "detailed": "verifyAttrThis"}],
            "semanticStr": ["select: scene->verify weather: overcast", "select: dress->relate: wearing", "..."]}
    features = {"id": S, "imageId": S, "question": S, "answer": S, "fullAnswer": S, "isBalanced": Value("bool"),
                "types": types, "semanticStr": S}
    write_table(root, "testdev_balanced_instructions/testdev-00000-of-00001.parquet", rows, features)
    write_table(root, "testdev_balanced_images/testdev-00000-of-00001.parquet",
                {"id": ["n15740", "n288870"], "image": [png(0), png(1)]}, {"id": S, "image": Image()})
    write_card(root, {"testdev_balanced_instructions": {"testdev": "testdev_balanced_instructions/testdev-*"},
                      "testdev_balanced_images": {"testdev": "testdev_balanced_images/testdev-*"}})
    return {"path": str(root)}


def scienceqa(root: Path) -> dict:
    rows = {"image": [png(0), png(1), png(2)],
            "question": ["Which of these states is farthest north?", "Which animal's feet are also adapted for "
                         "walking on snow?", "What is the capital of Utah?"],
            "choices": [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["camel", "snowshoe hare"],
                        ["Salt Lake City", "Denver", "Boise"]],
            "answer": [0, 1, 0], "hint": ["", "Polar bears live in the Arctic.", ""],
            "task": ["closed choice"] * 3, "grade": ["grade2", "grade4", "grade3"],
            "subject": ["social science", "natural science", "social science"],
            "topic": ["geography", "biology", "geography"], "category": ["Geography", "Adaptations", "Geography"],
            "skill": ["Read a map", "Animal adaptations", "Identify state capitals"], "lecture": [""] * 3,
            "solution": [""] * 3}
    features = {"image": Image(), "question": S, "choices": List(S), "answer": Value("int8"), "hint": S,
                "task": S, "grade": S, "subject": S, "topic": S, "category": S, "skill": S, "lecture": S,
                "solution": S}
    write_table(root, "ScienceQA-IMG/test-00000-of-00001.parquet", rows, features)
    write_card(root, {"ScienceQA-IMG": {"test": "ScienceQA-IMG/test-*"}})
    return {"path": str(root)}


def mmbench(root: Path) -> dict:
    # question 0 twice (options rotated: index 1000000 is its circular copy), question 1 with two options
    rows = {"index": [0, 1000000, 1],
            "question": ["What is the main colour of the image?"] * 2 + ["Is the shape a square?"],
            "hint": [None, None, "Look at the corners."],
            "A": ["red", "blue", "yes"], "B": ["blue", "green", "no"], "C": ["green", "red", None],
            "D": [None, None, None], "answer": ["A", "C", "A"],
            "category": ["image_style", "image_style", "attribute_recognition"], "image": [png(0), png(0), png(1)],
            "source": ["MMBench"] * 3, "L2-category": ["coarse_perception", "coarse_perception", "finegrained_perception"],
            "comment": [None] * 3, "split": ["dev"] * 3}
    features = {"index": Value("int64"), "question": S, "hint": S, "A": S, "B": S, "C": S, "D": S, "answer": S,
                "category": S, "image": Image(), "source": S, "L2-category": S, "comment": S, "split": S}
    for config in ("en", "cn"):
        write_table(root, f"{config}/dev-00000-of-00001.parquet", rows, features)
    write_card(root, {"en": {"dev": "en/dev-*"}, "cn": {"dev": "cn/dev-*"}})
    return {"path": str(root)}


def chartqa(root: Path) -> dict:
    rows = {"type": ["human_test", "human_test", "augmented_test"],
            "question": ["What is the value of the highest bar?", "Which year has the lowest value?",
                         "What percentage is blue?"],
            "answer": ["42", "2019", "12%"], "image": [png(i) for i in range(3)]}
    features = {"type": S, "question": S, "answer": S, "image": Image()}
    write_table(root, "data/test-00000-of-00001.parquet", rows, features)
    write_card(root, {"default": {"test": "data/test-*"}})
    return {"path": str(root)}


def ocrbench(root: Path) -> dict:
    rows = {"dataset": ["IIIT5K", "HME100k", "FUNSD"],
            "question": ["what is written in the image?", "Please write out the expression of the formula in the image using LaTeX format.",
                         "What is the date in the form?"],
            "question_type": ["Regular Text Recognition", "Handwritten Mathematical Expression Recognition",
                              "Key Information Extraction"],
            "answer": [["STOP"], ["x ^ { 2 }"], ["12/03/1998", "12.03.1998"]], "image": [png(i) for i in range(3)]}
    features = {"dataset": S, "question": S, "question_type": S, "answer": List(S), "image": Image()}
    write_table(root, "data/test-00000-of-00001.parquet", rows, features)
    write_card(root, {"default": {"test": "data/test-*"}})
    return {"path": str(root)}


MMMU_FEATURES = {"id": S, "question": S, "options": S, "explanation": S, **{f"image_{k}": Image() for k in range(1, 8)},
                 "img_type": S, "answer": S, "topic_difficulty": S, "question_type": S, "subfield": S}


def mmmu_rows(split: str, subject: str, questions: list[tuple]) -> dict:
    """MMMU rows: (question, options, answer, question_type, images {k: png index}) per question."""
    rows = {name: [] for name in MMMU_FEATURES}
    for number, (question, options, answer, question_type, images) in enumerate(questions, start=1):
        rows["id"].append(f"{split}_{subject}_{number}")
        rows["question"].append(question)
        rows["options"].append(repr(options))  # the hub stores the option list as its Python repr
        rows["explanation"].append("")
        for k in range(1, 8):
            rows[f"image_{k}"].append(png(images[k]) if k in images else None)
        rows["img_type"].append(repr(["Diagrams"] * len(images)))
        rows["answer"].append(answer)
        rows["topic_difficulty"].append("Easy")
        rows["question_type"].append(question_type)
        rows["subfield"].append(subject.replace("_", " "))
    return rows


MMMU_QUESTIONS = {  # subject -> split -> questions
    "Accounting": {
        "dev": [("<image 1> What is the total of the column?", ["$10", "$20", "$30", "$40"], "B", "multiple-choice",
                 {1: 0})],
        "validation": [
            ("Compare <image 1> and <image 2>: which ledger balances?", ["the first", "the second"], "A",
             "multiple-choice", {1: 1, 2: 2}),
            ("What is the net income shown in <image 1>? (in dollars)", [], "1,200", "open", {1: 3}),
        ],
    },
    "Art_Theory": {
        "dev": [("Which style is <image 1>?", ["Baroque", "Cubism", "<image 2>"], "C", "multiple-choice",
                 {1: 4, 2: 5})],
        "validation": [("How many figures are in <image 1>?", [], "['3', 'three']", "open", {1: 0})],
    },
}


def mmmu(root: Path) -> dict:
    """MMMU/MMMU's layout: one config per subject, each with its dev / validation / test parquet files."""
    configs = {}
    for subject, splits in MMMU_QUESTIONS.items():
        for split, questions in splits.items():
            write_table(root, f"{subject}/{split}-00000-of-00001.parquet", mmmu_rows(split, subject, questions),
                        MMMU_FEATURES)
        configs[subject] = {split: f"{subject}/{split}-*" for split in splits}
    write_card(root, configs)
    return {"path": str(root)}


def mmmu_lmms_lab(root: Path) -> dict:
    """lmms-lab/MMMU's layout: one default config holding every subject, files data/<split>-*.parquet."""
    for split in ("dev", "validation"):
        rows = {name: [] for name in MMMU_FEATURES}
        for subject, splits in MMMU_QUESTIONS.items():
            for name, values in mmmu_rows(split, subject, splits[split]).items():
                rows[name] += values
        write_table(root, f"data/{split}-00000-of-00001.parquet", rows, MMMU_FEATURES)
    write_card(root, {"default": {"dev": "data/dev-*", "validation": "data/validation-*"}})
    return {"path": str(root)}


# ---------------------------------------------------------------------------------------------------------
# Video benchmarks
# ---------------------------------------------------------------------------------------------------------
def egoschema(root: Path) -> dict:
    videos = root / "videos"
    names = ["001934bb-81bd-4cd8-a574-0472ef3f6678", "00b9a0de-c59e-49cb-a127-6081e2fb8c8e"]
    for i, name in enumerate(names):
        mp4(videos / f"{name}.mp4", i)
    options = [["A. c cooks", "B. c cleans", "C. c reads", "D. c paints", "E. c sleeps"],
               ["A. a dog", "B. a cat", "C. a bird", "D. a fish", "E. a horse"]]
    rows = {"question_idx": ["0", "1"], "question": ["What is c doing?", "Which animal appears?"],
            "video_idx": names, "option": options, "answer": ["0", "2"]}
    features = {"question_idx": S, "question": S, "video_idx": S, "option": List(S), "answer": S}
    write_table(root / "hub", "Subset/test-00000-of-00001.parquet", rows, features)
    write_table(root / "hub", "GENERATION/test-00000-of-00001.parquet", {**rows, "answer": [None, None]}, features)
    write_card(root / "hub", {"Subset": {"test": "Subset/test-*"}, "GENERATION": {"test": "GENERATION/test-*"}})
    return {"path": str(root / "hub"), "video_dir": str(videos)}


MVBENCH_WITH_BOUNDS = {"action_sequence", "action_prediction", "object_interaction", "action_localization"}


def mvbench(root: Path) -> dict:
    from tokenprune.data.benchmarks.mvbench import TASK_FOLDERS

    hub, videos = root / "hub", root / "videos"
    (hub / "json").mkdir(parents=True, exist_ok=True)
    for i, (task, folder) in enumerate(TASK_FOLDERS.items()):
        mp4(videos / folder / f"{task}_clip.mp4", i)
        entry = {"video": f"{task}_clip.mp4", "question": f"What happens in the {task.replace('_', ' ')} clip?",
                 "candidates": ["The square moves right.", "The square moves left.", "Nothing moves."],
                 "answer": "The square moves right."}
        if task in MVBENCH_WITH_BOUNDS:
            entry.update(start=0.0, end=2.0)
        (hub / "json" / f"{task}.json").write_text(json.dumps([entry]))
    write_card(hub, {task: {"train": f"json/{task}.json"} for task in TASK_FOLDERS})
    return {"path": str(hub), "video_dir": str(videos)}


def videomme(root: Path) -> dict:
    videos = root / "data"
    for i, name in enumerate(["fFjv93ACGo8", "JspVuT6rsLA"]):
        mp4(videos / f"{name}.mp4", i)
    rows = {"video_id": ["001", "001", "301"], "duration": ["short", "short", "long"],
            "domain": ["Knowledge", "Knowledge", "Sports Competition"],
            "sub_category": ["Humanity & History", "Humanity & History", "Football"],
            "url": ["https://www.youtube.com/watch?v=fFjv93ACGo8"] * 2 + ["https://www.youtube.com/watch?v=JspVuT6rsLA"],
            "videoID": ["fFjv93ACGo8", "fFjv93ACGo8", "JspVuT6rsLA"], "question_id": ["001-1", "001-2", "301-1"],
            "task_type": ["Counting Problem", "Object Recognition", "Action Reasoning"],
            "question": ["How many squares appear?", "What colour is the square?", "Where does the square go?"],
            "options": [["A. 1.", "B. 2.", "C. 3.", "D. 4."], ["A. Red.", "B. Green.", "C. Blue.", "D. Black."],
                        ["A. Left.", "B. Right.", "C. Up.", "D. Down."]],
            "answer": ["A", "A", "B"]}
    features = {k: S for k in rows if k != "options"} | {"options": List(S)}
    write_table(root / "hub", "videomme/test-00000-of-00001.parquet", rows, features)
    write_card(root / "hub", {"videomme": {"test": "videomme/test-*"}})
    return {"path": str(root / "hub"), "video_dir": str(root)}


BUILDERS = {"textvqa_val": textvqa, "mme": mme, "pope": pope, "gqa": gqa, "scienceqa_img": scienceqa,
            "mmbench_en": mmbench, "mmbench_cn": mmbench, "chartqa": chartqa, "ocrbench": ocrbench,
            "egoschema": egoschema, "mvbench": mvbench, "videomme": videomme, "mmmu_val": mmmu, "mmmu_dev": mmmu}
VIDEO_BENCHMARKS = ("egoschema", "mvbench", "videomme")


def build(name: str, root: Path) -> dict:
    """Write the tiny copy of benchmark ``name`` under ``root``; the dataset overrides that load it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](root)
