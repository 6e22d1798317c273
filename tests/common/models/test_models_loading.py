"""load_pipeline: the tiny preset through from_pretrained, and errors that name the problem."""
import pytest
import torch
from diffusers import StableDiffusionPipeline

from nablagfn.common.config import ModelConfig
from nablagfn.common.models import ModelLoadError, load_pipeline


def test_tiny_preset_loads_through_from_pretrained(tiny_sd_dir):
    pipe = load_pipeline(ModelConfig(pretrained="tiny"), cache_dir=tiny_sd_dir.parent)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
    img = pipe("a cat", num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def test_tiny_preset_is_built_on_demand_deterministically(tmp_path, tiny_sd_dir):
    pipe = load_pipeline(ModelConfig(pretrained="tiny"), cache_dir=tmp_path)
    assert (tmp_path / "tiny-sd" / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]  # no temporary build folder left
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values()):
        assert torch.equal(a, b)  # same seed → bit-identical weights


def test_missing_dir_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="no_such_model") as info:
        load_pipeline(ModelConfig(pretrained=str(missing)))
    assert str(missing) in str(info.value) and "model_index.json" in str(info.value)


def test_dir_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(ModelConfig(pretrained=str(tmp_path)))


def test_hub_id_not_available_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "nablagfn-tests/no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(ModelConfig(pretrained=hub_id, local_files_only=True))
    assert hub_id in str(info.value) and "local_files_only" in str(info.value)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_folder_of_another_family_says_which(family, tiny_sd_dir):
    with pytest.raises(ModelLoadError, match="model.family=sd "):
        load_pipeline(ModelConfig(pretrained=str(tiny_sd_dir), family=family))


def test_preset_needs_a_cache_dir():
    with pytest.raises(ModelLoadError, match="cache_dir"):
        load_pipeline(ModelConfig(pretrained="tiny"))


def test_half_precision_on_cpu_falls_back_to_float32(tiny_sd_dir):
    with pytest.warns(UserWarning, match="float32"):
        pipe = load_pipeline(ModelConfig(pretrained=str(tiny_sd_dir), dtype="float16"))
    assert pipe.unet.dtype == torch.float32
