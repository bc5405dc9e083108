"""The trained tiny models shipped with the package: held-out accuracy, an image-swap control, loading through
the ordinary checkpoint path, and a smoke test of the training script."""

from __future__ import annotations

import json

import pytest
import torch

import tokenprune as tp
from tokenprune.data.synthetic import COLOURS, DIRECTIONS, SyntheticImageQA, SyntheticVideoQA
from tokenprune.models.zoo import train as zoo_train
from tokenprune.models.zoo.checkpoints import packaged_checkpoint

HELD_OUT = 120  # >= 100 held-out samples per evaluation


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained(name: str):
    path = packaged_checkpoint(name)
    assert path is not None, f"{name}: no packaged checkpoint (python -m tokenprune.models.zoo.train {name})"
    return tp.load_model(name, device="cpu")


def answers(vlm, dataset, visual_from=None) -> list[float]:
    """Per-sample exact-match scores of greedy answers; ``visual_from(index)`` gives the index of another sample
    whose pixels replace this sample's (same grid), so the question meets a different image's visual tokens."""
    eos = vlm.processor.tokenizer.eos_token_id
    scores = []
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            inputs = vlm.prepare(sample)
            if visual_from is not None:
                other = vlm.prepare(dataset[visual_from(index)])
                for key in ("pixel_values", "pixel_values_videos"):
                    if key in inputs:
                        assert other[key].shape == inputs[key].shape
                        inputs[key] = other[key]
            output = vlm.model.generate(**inputs, max_new_tokens=dataset.max_new_tokens, do_sample=False,
                                        eos_token_id=eos, pad_token_id=eos)
            scores.append(float(dataset.scorer.score(vlm.decode(output[0, inputs["input_ids"].shape[1]:]), sample)))
    return scores


def test_packaged_checkpoints_load_through_the_stock_classes_like_a_real_checkpoint():
    from transformers import AutoConfig, AutoProcessor

    for name, model_type in (("tiny_llava", "llava"), ("tiny_qwen25vl", "qwen2_5_vl")):
        path = packaged_checkpoint(name)
        assert path is not None
        assert AutoConfig.from_pretrained(path).model_type == model_type
        processor = AutoProcessor.from_pretrained(path)
        assert processor.chat_template
        card = json.loads((tp.models.zoo.checkpoints.CHECKPOINT_ROOT / name / "training.json").read_text())
        assert card["name"] == name and card["heldout_image_accuracy"]["all"] >= 90
        vlm = tp.load_model(name, device="cpu")  # the default path: weights=pretrained, the packaged directory
        assert type(vlm.model).__name__ == {"llava": "LlavaForConditionalGeneration",
                                            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[model_type]
        assert vlm.prepare(SyntheticImageQA(limit=1)[0]).layout.num_visual >= 144


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen25vl"])
def test_heldout_image_accuracy_at_least_90(name):
    scores = answers(trained(name), SyntheticImageQA(limit=HELD_OUT, split="test"))
    assert 100 * sum(scores) / len(scores) >= 90


def test_heldout_video_accuracy_at_least_80():
    dataset = SyntheticVideoQA(limit=HELD_OUT, split="test")
    scores = answers(trained("tiny_qwen25vl"), dataset)
    assert 100 * sum(scores) / len(scores) >= 80


def chance(dataset) -> float:
    """Expected accuracy (%) of guessing uniformly among each task's possible answers."""
    options = {"colour_at": len(COLOURS), "left_of": 2, "count": 4, "shape_at": 4, "direction": len(DIRECTIONS),
               "first": 2}
    return 100 * sum(1 / options[dataset[i].meta["task"]] for i in range(len(dataset))) / len(dataset)


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen25vl"])
def test_answers_come_from_the_image_not_the_question(name):
    """Control: with the visual tokens of a different image (the next sample's pixels), accuracy falls to
    chance (+10 points at most), while the same questions with their own images stay >= 90%."""
    vlm = trained(name)
    dataset = SyntheticImageQA(limit=HELD_OUT, split="test")
    own = answers(vlm, dataset)
    swapped = answers(vlm, dataset, visual_from=lambda i: (i + 7) % len(dataset))
    assert 100 * sum(own) / len(own) >= 90
    assert 100 * sum(swapped) / len(swapped) <= chance(dataset) + 10


def test_video_answers_come_from_the_video():
    vlm = trained("tiny_qwen25vl")
    dataset = SyntheticVideoQA(limit=HELD_OUT, split="test")
    swapped = answers(vlm, dataset, visual_from=lambda i: (i + 7) % len(dataset))
    assert 100 * sum(swapped) / len(swapped) <= chance(dataset) + 10


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen25vl"])
def test_training_script_smoke(name, tmp_path):
    """A few steps of the real recipe (Qwen2.5-VL: an image step and a video step) write a checkpoint that
    the ordinary loader reads back; the losses are finite."""
    steps = 3 if name == "tiny_qwen25vl" else 2
    result = zoo_train.train(name, tmp_path, steps=steps, log_every=0, evaluate_after=False)
    assert result["steps"] == steps and torch.isfinite(torch.tensor(result["final_loss"]))
    assert {"model.safetensors", "config.json", "README.md", "training.json"} <= {p.name for p in tmp_path.iterdir()}
    vlm = tp.load_model(name, path=str(tmp_path), device="cpu")
    with torch.no_grad():
        logits = vlm.model(**vlm.prepare(SyntheticImageQA(limit=1)[0])).logits
    assert torch.isfinite(logits).all()


def test_training_is_deterministic(tmp_path):
    first = zoo_train.train("tiny_llava", tmp_path / "a", steps=2, log_every=0, evaluate_after=False)
    second = zoo_train.train("tiny_llava", tmp_path / "b", steps=2, log_every=0, evaluate_after=False)
    assert first["final_loss"] == second["final_loss"]


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="trainable models: tiny_llava, tiny_qwen25vl"):
        zoo_train.train("llava15_7b", tmp_path)
