"""Benchmarks load from tiny local copies in their real hub format (tests/fixtures_benchmarks.py) through the code
a user's download goes through, build lmms-eval's prompts, run on the tiny models, and fail clearly on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest
import torch

import fixtures_benchmarks as fb
from conftest import tiny_vlm
from tokenprune.data import DatasetError, create_dataset
from tokenprune.data.benchmarks import hub
from tokenprune.models import ModelInputError

BENCHMARKS = sorted(fb.BUILDERS)


pytestmark = pytest.mark.usefixtures("one_torch_thread", "datasets_cache")


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("benchmarks")
    return {name: fb.build(name, root / name) for name in BENCHMARKS}


def load(copies, name, **overrides):
    return create_dataset(name, **{**copies[name], **overrides})


# ---------------------------------------------------------------------------------------------------------
# Loading and prompts
# ---------------------------------------------------------------------------------------------------------
SIZES = {"textvqa_val": 3, "mme": 6, "pope": 6, "gqa": 3, "scienceqa_img": 3, "mmbench_en": 3, "mmbench_cn": 3,
         "chartqa": 3, "ocrbench": 3, "egoschema": 2, "mvbench": 20, "videomme": 3, "mmmu_val": 3, "mmmu_dev": 2}
IMAGES = {"mmmu_val": [2, 1, 1], "mmmu_dev": [1, 2]}  # every image a question (or its options) references


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_loads_from_its_local_copy(copies, name):
    dataset = load(copies, name)
    assert len(dataset) == SIZES[name]
    samples = list(dataset)
    assert len({s.id for s in samples}) == len(samples)
    assert [dataset.sample_id(i) for i in range(len(dataset))] == [s.id for s in samples]
    for i, s in enumerate(samples):
        assert s.question and s.answer is not None
        if name in fb.VIDEO_BENCHMARKS:
            assert s.images == [] and Path(s.video).is_file()
        else:
            assert s.video is None and len(s.images) == IMAGES.get(name, [1] * len(samples))[i]
            assert all(image["bytes"].startswith(b"\x89PNG") for image in s.images)
    assert dataset.scorer.headline in dataset.scorer.aggregate([])


PROMPTS = {  # (index, question, answer): lmms-eval's default prompts, written out by hand
    "textvqa_val": (0, "What brand is the phone?\nAnswer the question using a single word or phrase.",
                    ["nokia"] * 7 + ["nokia phone"] * 3),
    "mme": (1, "Is there a bed in this image?\nAnswer the question using a single word or phrase.", "No"),
    "pope": (0, "Is there a dog in the image?\nAnswer the question using a single word or phrase.", "yes"),
    "gqa": (1, "Who is wearing the dress?\nAnswer the question using a single word or phrase.", "woman"),
    "scienceqa_img": (1, "Context: Polar bears live in the Arctic.\nWhich animal's feet are also adapted for walking "
                         "on snow?\nA. camel\nB. snowshoe hare\nAnswer with the option's letter from the given "
                         "choices directly.", "B"),
    "mmbench_en": (2, "Look at the corners. Is the shape a square? There are several options:\nA. yes\nB. no\n\n"
                      "Answer with the option's letter from the given choices directly.", "A"),
    "mmbench_cn": (1, "What is the main colour of the image? There are several options:\nA. blue\nB. green\nC. red"
                      "\n\n请直接使用所提供的选项字母作为答案回答。", "C"),
    "chartqa": (2, "What percentage is blue?\nAnswer the question with a single word.", "12%"),
    "ocrbench": (2, "What is the date in the form?", ["12/03/1998", "12.03.1998"]),
    "egoschema": (1, "Which animal appears?\nA. a dog\nB. a cat\nC. a bird\nD. a fish\nE. a horse\nAnswer with the "
                     "option's letter from the given choices directly.", "C"),
    "mvbench": (0, "Question:What happens in the action sequence clip?\nOption:\n(A) The square moves right.\n"
                   "(B) The square moves left.\n(C) Nothing moves.\nOnly give the best option.\n", "A"),
    "videomme": (2, "Select the best answer to the following multiple-choice question based on the video and the "
                    "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\nWhere does the "
                    "square go?\nA. Left.\nB. Right.\nC. Up.\nD. Down.\n\nAnswer with the option's letter from the "
                    "given choices directly.", "B"),
    "mmmu_val": (0, "Compare <image 1> and <image 2>: which ledger balances?\nA. the first\nB. the second\n\nAnswer "
                    "with the option's letter from the given choices directly.", "A"),
    "mmmu_dev": (1, "Which style is <image 1>?\nA. Baroque\nB. Cubism\nC. <image 2>\n\nAnswer with the option's "
                    "letter from the given choices directly.", "C"),
}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_prompts_and_answers_follow_lmms_eval(copies, name):
    index, question, answer = PROMPTS[name]
    sample = load(copies, name, seed=None)[index]
    assert sample.question == question
    assert sample.answer == answer


def test_meta_carries_what_the_aggregates_need(copies):
    assert load(copies, "mme")[0].meta == {"question_id": "existence/000000006040.jpg", "category": "existence"}
    assert load(copies, "mmbench_en")[1].meta["question"] == 0  # index 1000000 is a rotation of question 0
    assert load(copies, "videomme")[2].meta["duration"] == "long"
    assert load(copies, "mvbench")[19].meta == {"task_type": "counterfactual_inference"}
    assert load(copies, "egoschema")[0].choices == ["c cooks", "c cleans", "c reads", "c paints", "c sleeps"]
    assert load(copies, "gqa")[0].meta == {"structural": "verify", "semantic": "global"}


# ---------------------------------------------------------------------------------------------------------
# Running on the tiny models (Python API)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_runs_on_a_tiny_model(copies, name):
    dataset = load(copies, name)
    vlm = tiny_vlm("tiny_qwen25vl" if name in fb.VIDEO_BENCHMARKS else "tiny_llava")
    sample = dataset[0]
    inputs = vlm.prepare(sample)
    with torch.no_grad():
        output = vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    prediction = vlm.decode(output[0, inputs["input_ids"].shape[1]:])
    score = dataset.scorer.score(prediction, sample)
    assert 0.0 <= score <= 1.0
    metrics = dataset.scorer.aggregate([{"id": sample.id, "prediction": prediction, "answer": sample.answer,
                                         "score": score, "error": None, "meta": sample.meta}])
    assert dataset.scorer.headline in metrics


def test_image_benchmarks_also_run_on_qwen25vl(copies):
    vlm = tiny_vlm("tiny_qwen25vl")
    inputs = vlm.prepare(load(copies, "textvqa_val")[0])
    assert inputs["image_grid_thw"].shape == (1, 3)


# ---------------------------------------------------------------------------------------------------------
# Local formats and the hub
# ---------------------------------------------------------------------------------------------------------
def test_save_to_disk_copies_and_single_files_load(copies, tmp_path):
    table = datasets.load_dataset(copies["pope"]["path"], split="test")
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "dict"))
    table.save_to_disk(str(tmp_path / "split"))
    table.to_parquet(str(tmp_path / "pope.parquet"))
    for path in ("dict", "split", "pope.parquet"):
        dataset = create_dataset("pope", path=str(tmp_path / path))
        assert [s.id for s in dataset] == [str(i) for i in range(6)]
        assert dataset[0].images[0]["bytes"].startswith(b"\x89PNG")
    with pytest.raises(DatasetError, match=r"dataset.split='val' is not in .*dict; its splits are \['test'\]"):
        create_dataset("pope", path=str(tmp_path / "dict"), split="val")


def test_a_plain_directory_of_data_files_is_taken_as_the_config(copies, tmp_path):
    shutil.copytree(Path(copies["scienceqa_img"]["path"]) / "ScienceQA-IMG", tmp_path / "data")
    assert len(create_dataset("scienceqa_img", path=str(tmp_path))) == 3


def test_a_local_copy_edited_in_place_is_read_again(copies, tmp_path):
    # datasets alone would serve the cached table of a README-configured directory after an edit
    shutil.copytree(copies["chartqa"]["path"], tmp_path / "chartqa")
    assert create_dataset("chartqa", path=str(tmp_path / "chartqa"))[0].answer == "42"
    rows = {"type": ["human_test"], "question": ["How many?"], "answer": ["43"], "image": [fb.png(0)]}
    fb.write_table(tmp_path / "chartqa", "data/test-00000-of-00001.parquet", rows,
                   {"type": fb.S, "question": fb.S, "answer": fb.S, "image": datasets.Image()})
    assert create_dataset("chartqa", path=str(tmp_path / "chartqa"))[0].answer == "43"


def test_gqa_questions_and_images_from_separate_files(copies, tmp_path):
    root = Path(copies["gqa"]["path"])
    questions = next((root / "testdev_balanced_instructions").glob("*.parquet"))
    images = next((root / "testdev_balanced_images").glob("*.parquet"))
    with pytest.raises(DatasetError, match="give dataset.images_path"):
        create_dataset("gqa", path=str(questions))
    dataset = create_dataset("gqa", path=str(questions), images_path=str(images))
    assert dataset[2].images[0] == load(copies, "gqa")[2].images[0]
    # save_to_disk of both configs, one directory each
    for config in ("testdev_balanced_instructions", "testdev_balanced_images"):
        datasets.load_dataset(str(root), config, split="testdev").save_to_disk(str(tmp_path / config))
    assert [s.id for s in create_dataset("gqa", path=str(tmp_path))] == ["201307251", "201640614", "20968379"]


def test_gqa_question_whose_image_is_missing_names_it(copies, tmp_path):
    root = Path(copies["gqa"]["path"])
    images = datasets.load_dataset(str(root), "testdev_balanced_images", split="testdev").select([0])
    images.to_parquet(str(tmp_path / "images.parquet"))
    questions = next((root / "testdev_balanced_instructions").glob("*.parquet"))
    dataset = create_dataset("gqa", path=str(questions), images_path=str(tmp_path / "images.parquet"))
    with pytest.raises(DatasetError, match="image 'n288870' of question '20968379'"):
        dataset[2]


@pytest.fixture
def fake_hub(monkeypatch, copies):
    """The hub holds only the new name of POPE, served from the local copy."""
    calls = []

    def split_names(name, config=None, revision=None, **kwargs):
        calls.append(name)
        if name != "lmms-lab-encoder/POPE":
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return ["test"]

    def load_dataset(name, config=None, split=None, revision=None, **kwargs):
        assert name == "lmms-lab-encoder/POPE", name
        return datasets.Dataset.from_parquet(next(Path(copies["pope"]["path"]).glob("data/*.parquet")).as_posix())

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_falls_back_from_the_old_name_to_the_new_one(fake_hub):
    dataset = create_dataset("pope")
    assert fake_hub == ["lmms-lab/POPE", "lmms-lab-encoder/POPE"]
    assert len(dataset) == 6


def test_hub_errors_name_every_tried_name_and_the_split(fake_hub):
    with pytest.raises(DatasetError, match=r"could not load lmms-lab/POPE or lmms-lab/POPE-v2 .*dataset.path"):
        create_dataset("pope", hub_names=["lmms-lab/POPE", "lmms-lab/POPE-v2"])
    with pytest.raises(DatasetError, match=r"dataset.split='validation' is not a split of lmms-lab-encoder/POPE; "
                                           r"its splits are \['test'\]"):
        create_dataset("pope", split="validation")


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any sample is built, or an error for that one sample
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", fb.VIDEO_BENCHMARKS)
def test_missing_video_dir_is_a_loader_error(copies, name):
    with pytest.raises(DatasetError, match=f"{name} needs dataset.video_dir"):
        load(copies, name, video_dir=None)
    with pytest.raises(DatasetError, match=r"dataset.video_dir='/no/such/dir' is not a directory"):
        load(copies, name, video_dir="/no/such/dir")


def test_a_missing_video_fails_only_its_sample(copies, tmp_path):
    video_dir = tmp_path / "videos"
    shutil.copytree(copies["videomme"]["video_dir"], video_dir)
    (video_dir / "data" / "JspVuT6rsLA.mp4").unlink()
    dataset = load(copies, "videomme", video_dir=str(video_dir))
    vlm = tiny_vlm("tiny_qwen25vl")
    vlm.prepare(dataset[0])  # its video is there
    with pytest.raises(ModelInputError, match="video file not found: .*JspVuT6rsLA.mp4"):
        vlm.prepare(dataset[2])


def test_a_corrupt_image_fails_only_its_sample(tmp_path):
    rows = {"type": ["human_test"] * 2, "question": ["What is shown?"] * 2, "answer": ["42"] * 2,
            "image": [fb.png(0), {"bytes": b"not an image", "path": "1.png"}]}
    fb.write_table(tmp_path, "chartqa.parquet", rows, {"type": fb.S, "question": fb.S, "answer": fb.S,
                                                       "image": datasets.Image()})
    dataset = create_dataset("chartqa", path=str(tmp_path / "chartqa.parquet"))
    vlm = tiny_vlm("tiny_llava")
    vlm.prepare(dataset[0])
    with pytest.raises(ModelInputError, match="cannot read image"):
        vlm.prepare(dataset[1])


def test_a_wrong_column_set_names_the_missing_columns(copies, tmp_path):
    table = datasets.load_dataset(copies["textvqa_val"]["path"], split="validation")
    table.remove_columns(["answers"]).rename_column("question", "query").to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DatasetError, match=r"lacks the column\(s\) \['question', 'answers'\]; it has \[.*'query'"):
        create_dataset("textvqa_val", path=str(tmp_path / "t.parquet"))


@pytest.mark.parametrize("name, overrides, message", [
    ("textvqa_val", {"split": "train"}, r"dataset.split='train' is not a split of .*; its splits are \['validation'\]"),
    ("scienceqa_img", {"config": "ScienceQA-FULL"},
     r"dataset.config='ScienceQA-FULL' is not a config of .*; its configs are \['ScienceQA-IMG'\]"),
    ("mme", {"path": "/no/such/copy"}, r"dataset.path='/no/such/copy' does not exist"),
    ("egoschema", {"config": "GENERATION"}, r"config 'GENERATION' has rows without an answer"),
])
def test_bad_split_config_or_path_is_a_clear_error(copies, name, overrides, message):
    with pytest.raises(DatasetError, match=message):
        load(copies, name, **overrides)


def test_bad_fields_are_refused_before_loading(copies, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"must be a directory or a file ending in \.parquet"):
        create_dataset("chartqa", path=str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"mvbench.tasks must be a non-empty subset of .*unknown: \['dance'\]"):
        load(copies, "mvbench", tasks=["dance"])
    with pytest.raises(ValueError, match=r"has no field\(s\) video_dir; its fields are: .*split"):
        create_dataset("textvqa_val", video_dir="/videos")
    with pytest.raises(ValueError, match="textvqa_val.limit must be an integer >= 0 or null"):
        load(copies, "textvqa_val", limit=-1)


def test_mvbench_answer_outside_its_candidates_names_it(copies, tmp_path):
    hub_copy = tmp_path / "hub"
    shutil.copytree(copies["mvbench"]["path"], hub_copy)
    (hub_copy / "json" / "fine_grained_pose.json").write_text(
        '[{"video": "fine_grained_pose_clip.mp4", "question": "q?", "candidates": ["a", "b"], "answer": "c"}]')
    dataset = create_dataset("mvbench", path=str(hub_copy), video_dir=copies["mvbench"]["video_dir"],
                             tasks=["fine_grained_pose"])
    with pytest.raises(DatasetError, match=r"the answer 'c' of fine_grained_pose/0 is not one of its candidates"):
        dataset[0]


# ---------------------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------------------
def test_limit_takes_a_seeded_subset_or_the_first_rows(copies):
    first = load(copies, "pope", limit=3, seed=None)
    assert [s.id for s in first] == ["0", "1", "2"]
    seeded = [s.id for s in load(copies, "pope", limit=3, seed=1)]
    assert seeded == [s.id for s in load(copies, "pope", limit=3, seed=1)]  # deterministic
    assert len(seeded) == 3 and seeded == sorted(seeded, key=int)  # kept in table order
    subsets = {tuple(s.id for s in load(copies, "pope", limit=3, seed=seed)) for seed in range(5)}
    assert len(subsets) > 1


def test_limit_keeps_mme_pairs_and_mmbench_rotations_together(copies):
    for seed in (None, 0, 1, 2):
        mme = load(copies, "mme", limit=3, seed=seed)
        assert len(mme) == 2 and mme[0].meta["question_id"] == mme[1].meta["question_id"]
    rotations = load(copies, "mmbench_en", limit=2, seed=None)
    assert [s.id for s in rotations] == ["0", "1000000"]


def test_select_rows():
    assert hub.select_rows("t", 5, None, 0) == [0, 1, 2, 3, 4]
    assert hub.select_rows("t", 5, 9, 0) == [0, 1, 2, 3, 4]
    assert hub.select_rows("t", 5, 2, None) == [0, 1]
    assert hub.select_rows("t", 6, 3, None, groups=["a", "a", "b", "b", "c", "c"]) == [0, 1]
    assert hub.select_rows("t", 5, 3, None, groups=["a", "a", "b", "b", "c"]) == [0, 1, 4]  # skips what does not fit
    assert hub.select_rows("t", 4, 0, 3) == []
