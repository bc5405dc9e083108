"""Issue 17, "every check before any model work": layer ranges from config.json, every model.* field, checkpoint
family, hub ids and benchmarks while offline, run.json only after validation, weights=random's memory estimate."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import Qwen2VLConfig

import tokenprune as tp
import tokenprune.run.runner as runner_module
from tokenprune.models.llava import llava15_config
from tokenprune.run.results import read_records
from tokenprune.run.runner import ConfigError, build_plan, run_benchmark


def config(tmp_path: Path, *overrides: str):
    with initialize_config_module("tokenprune.conf", version_base=None):
        return compose("config", overrides=[f"run.output_dir={tmp_path}", "run.progress=false", *overrides])


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load weights fails the test: the checks must not need them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner_module, "load_model", refuse)
    monkeypatch.setattr(tp.models.base.ModelAdapter, "load_pretrained", refuse)


def checkpoint_without_weights(directory: Path, config) -> Path:
    """A checkpoint directory holding only config.json: whatever reads it cannot have loaded weights."""
    directory.mkdir(parents=True, exist_ok=True)
    config.to_json_file(directory / "config.json")
    return directory


# ---------------------------------------------------------------------------------------------------------
# layer ranges before loading
# ---------------------------------------------------------------------------------------------------------
def test_layer_range_comes_from_config_json_before_any_weight(tmp_path, no_model_loading):
    path = checkpoint_without_weights(tmp_path / "llava", llava15_config("7b"))
    cfg = config(tmp_path / "run", "model=llava15_7b", f"model.path={path}", "method.layer=99")
    with pytest.raises(ConfigError, match=r"fastv.layer=99 is out of range: the model has 32 decoder layers "
                                          r"\(valid indices 1..31\)"):
        build_plan(cfg)
    assert not (tmp_path / "run" / "run.json").exists()


def test_layer_range_of_the_packaged_tiny_model(tmp_path, no_model_loading):
    with pytest.raises(ConfigError, match="pdrop.layers\\[0\\]=8 is out of range: the model has 6 decoder layers"):
        build_plan(config(tmp_path, "method=pdrop", "method.layers=[8,16,24]"))


# ---------------------------------------------------------------------------------------------------------
# every model.* field
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,pattern", [
    (["model.dtype=bf16"], r"model.dtype='bf16' is not allowed; choose from \['float32', 'float16', 'bfloat16'\]"),
    (["model.weights=trained"], r"model.weights='trained' is not allowed; choose from \['pretrained', 'random'\]"),
    (["model.device=gpu0"], r"model.device='gpu0' is not allowed; choose from auto, cpu, cuda, cuda:N"),
    (["model.attn_implementation=flash"], r"model.attn_implementation='flash' is not allowed; choose from \['sdpa'"),
    (["model=tiny_qwen25vl", "model.video.min_pixels=0"], r"model.video.min_pixels must be an integer >= 1, got 0"),
    (["model.video.nframes=8"], r"model.video.nframes is not an option of the llava family \(no model.video options\)"),
    (["model=tiny_qwen25vl", "model.image.min_pixels=0"], r"model.image.min_pixels must be an integer >= 1"),
    (["+model.colour=red"], r"model has no field\(s\) colour; its fields are: name .*dtype .*video"),
    (["+model.family=qwen25vl"], r"model.family='qwen25vl' does not match model=tiny_llava, which is of the 'llava'"),
    (["+model.family=blip"], r"model.family='blip': unknown model family 'blip'; available: llava, qwen25vl"),
    (["model.name=llava99"], r"model='llava99' is unknown; available models: .*tiny_llava.*define a model of your own"),
    (["model.path=/nonexistent/ckpt"], r"model.path='/nonexistent/ckpt' does not exist \(model=tiny_llava\)"),
])
def test_every_model_field_is_checked_with_the_allowed_values(tmp_path, no_model_loading, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_plan(config(tmp_path, *overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CUDA-only settings on a CPU machine")
@pytest.mark.parametrize("overrides,pattern", [
    (["model.device=cuda"], "model.device='cuda' but CUDA is not available"),
    (["model.attn_implementation=flash_attention_2"], "flash_attention_2' needs a CUDA device"),
])
def test_cuda_settings_without_cuda(tmp_path, no_model_loading, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_plan(config(tmp_path, *overrides))


def test_a_typo_on_the_command_line_is_a_configuration_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["tokenprune", "method=fastv", "model.dtype=bf16", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("tokenprune", run_name="__main__", alter_sys=False)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "tokenprune: configuration error: model.dtype='bf16' is not allowed" in err and "Traceback" not in err
    assert not (tmp_path / "run.json").exists()


def test_a_checkpoint_of_another_family_is_refused_naming_both(tmp_path, no_model_loading):
    path = checkpoint_without_weights(tmp_path / "qwen2vl", Qwen2VLConfig())
    with pytest.raises(ConfigError, match="holds a 'qwen2_vl' checkpoint .* model=qwen25vl_7b is of the 'qwen25vl' "
                                          "family, which loads 'qwen2_5_vl' checkpoints"):
        build_plan(config(tmp_path / "run", "model=qwen25vl_7b", f"model.path={path}"))


# ---------------------------------------------------------------------------------------------------------
# the hub while offline
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(params=["HF_HUB_OFFLINE=1", "no network"])
def offline(request, monkeypatch):
    """Offline either way; any hub access through transformers or datasets fails the test."""
    import datasets
    import transformers

    if request.param == "no network":
        import socket

        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # CI sets some
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
        try:  # a probe cached by an earlier test must not answer for this one
            from tokenprune.network import _reachable

            _reachable.cache_clear()
        except ImportError:
            pass
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def contacted(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    local_config = transformers.AutoConfig.from_pretrained

    def config_from(path, *args, **kwargs):  # local directories only
        if not Path(path).is_dir():
            contacted()
        return local_config(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", contacted)
    monkeypatch.setattr(datasets, "get_dataset_split_names", contacted)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_from)
    return request.param


def test_a_hub_id_as_model_path_while_offline_is_refused_at_once(tmp_path, offline, no_model_loading):
    expected = "HF_HUB_OFFLINE=1" if offline == "HF_HUB_OFFLINE=1" else "unreachable"
    with pytest.raises(ConfigError, match=f"model.path='llava-hf/llava-1.5-7b-hf' is a Hugging Face hub id, but the "
                                          f"hub cannot be reached \\(.*{expected}.*\\).*huggingface-cli download"):
        build_plan(config(tmp_path, "model=llava15_7b", "model.path=llava-hf/llava-1.5-7b-hf"))


def test_a_benchmark_without_a_local_copy_while_offline_says_what_to_download(tmp_path, offline):
    with pytest.raises(ConfigError, match="dataset=textvqa_val needs the Hugging Face hub .*Download the "
                                          "lmms-lab/textvqa dataset.* set dataset.path"):
        build_plan(config(tmp_path, "dataset=textvqa_val"))


# ---------------------------------------------------------------------------------------------------------
# run.json only after validation
# ---------------------------------------------------------------------------------------------------------
def test_a_failed_launch_never_blocks_its_run_directory(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="fastv.layer=9 is out of range"):
        run_benchmark(config(tmp_path, "method.layer=9"))
    assert not (tmp_path / "run.json").exists()

    def out_of_memory(model):  # validation passed, then loading failed: nothing recorded yet
        raise torch.OutOfMemoryError("loading failed")

    monkeypatch.setattr(runner_module, "load_vlm", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_benchmark(config(tmp_path, "method.layer=3"))
    monkeypatch.undo()
    run_benchmark(config(tmp_path, "dataset.limit=1", "run.max_new_tokens=1"))  # the corrected command
    assert len(read_records(tmp_path)) == 1
    assert json.loads((tmp_path / "run.json").read_text())["max_new_tokens"] == 1


# ---------------------------------------------------------------------------------------------------------
# weights=random: estimate, refuse, build on the target device
# ---------------------------------------------------------------------------------------------------------
def test_random_weights_refused_with_the_estimate_when_memory_is_short(monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(tp.models.adapter_named("qwen25vl"), "build_random", built)
    from tokenprune.models import checks as model_checks

    monkeypatch.setattr(model_checks, "available_bytes", lambda device: 2**30)
    with pytest.raises(ValueError, match=r"model.weights=random: qwen25vl_7b in bfloat16 needs about 15.4 GiB for "
                                         r"its weights, and cpu has 1.0 GiB free"):
        tp.load_model("qwen25vl_7b", weights="random", dtype="bfloat16", device="cpu")


def test_the_estimate_is_the_built_model_size():
    from tokenprune.models import checks as model_checks

    config = tp.models.model_spec("tiny_llava").random_config()
    estimate = model_checks.estimate_weight_bytes("llava", config, torch.float32)
    model = tp.models.adapter_named("llava").build_random(config, torch.float32, "sdpa", seed=0)
    tensors = [*model.parameters(), *model.buffers()]
    assert estimate == sum(t.numel() * t.element_size() for t in tensors)


def test_random_weights_are_created_on_the_target_device():
    """Built under the target device (here the meta device: nothing is allocated, and a CPU-first build would
    leave CPU parameters), never in host memory first."""
    from tokenprune.models import checks as model_checks

    config = tp.models.model_spec("qwen25vl_7b").random_config()
    model = model_checks.build_random_on_device("qwen25vl_7b", "qwen25vl", config, torch.bfloat16, "sdpa", 0,
                                                torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) > 8e9
