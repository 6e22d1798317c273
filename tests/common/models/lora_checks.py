"""Checks shared by the model-family tests (SDXL, SD3)."""
import torch


def assert_lora_round_trip(pipe, pipeline_cls, model_dir, family, cache_dir, lora_cfg, x, t, guidance, prompts,
                           tmp_path):
    """The LoRA'd `pipe` (adapter already added and perturbed) saved in the diffusers format and
    reloaded by `pipeline_cls.load_lora_weights`, and through the state-dict path into a fresh
    `load_pipeline(family)`: both give bit-identical ε (so alpha ≠ rank must travel in the metadata)."""
    from nablagfn.common.config import ModelConfig
    from nablagfn.common.models import (Denoiser, add_lora, load_lora_state_dict, load_pipeline, lora_state_dict,
                                        save_lora_diffusers)

    d = Denoiser.from_pipeline(pipe)
    cond, uncond = d.encode_prompts(prompts), d.encode_prompts([""])
    with torch.no_grad():
        ref, pre = d.eps(x, t, cond, uncond, guidance), d.eps(x, t, cond, uncond, guidance, adapter=False)
    assert (ref - pre).abs().max() > 1e-3  # the adapter acts
    save_lora_diffusers(pipe, tmp_path / "lora")
    fresh = pipeline_cls.from_pretrained(model_dir)
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(Denoiser.from_pipeline(fresh).eps(x, t, cond, uncond, guidance), ref)
    other = load_pipeline(ModelConfig(pretrained="tiny", family=family), cache_dir=cache_dir)
    add_lora(other.unet, lora_cfg)
    load_lora_state_dict(other.unet, lora_state_dict(pipe.unet))
    with torch.no_grad():
        assert torch.equal(Denoiser.from_pipeline(other).eps(x, t, cond, uncond, guidance), ref)
