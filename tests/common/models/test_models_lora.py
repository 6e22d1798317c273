"""The LoRA policy: default config, exact pretrained outputs, and exact (de)serialisation."""
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer

from nablagfn.common.config import LoRAConfig
from nablagfn.common.models import (adapters_disabled, add_lora, load_lora_state_dict,
                                    lora_parameters, lora_state_dict, save_lora_diffusers)


def _out(unet, inputs):
    x, t, emb = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=emb).sample


def test_default_config_applied(pipe, unet_inputs):
    reference = _out(pipe.unet, unet_inputs)
    params = add_lora(pipe.unet)
    cfg = pipe.unet.peft_config["default"]
    assert cfg.r == 8 and cfg.lora_alpha == 8
    assert set(cfg.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    wrapped = [n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    targets = [n for n, _ in pipe.unet.named_modules()
               if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert sorted(wrapped) == sorted(targets) and len(wrapped) > 0
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert len(trainable) == len(params) == 2 * len(wrapped)  # only lora_A/lora_B train
    # lora_B is initialised to 0, so the fresh policy IS the pretrained model: exact equality.
    assert torch.equal(_out(pipe.unet, unet_inputs), reference)


def test_lora_params_stay_float32_on_half_weights(pipe):
    pipe.unet.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in add_lora(pipe.unet))


def test_adapter_disabled_is_exactly_the_pretrained_unet(pipe, unet_inputs, perturb_lora):
    reference = _out(pipe.unet, unet_inputs)
    add_lora(pipe.unet)
    perturb_lora(pipe.unet)
    policy = _out(pipe.unet, unet_inputs)
    assert (policy - reference).abs().max() > 1e-3  # the adapter really changes the output
    with adapters_disabled(pipe.unet):
        # Disabled peft layers run only the frozen base layer: the same ops, so bit-identical.
        assert torch.equal(_out(pipe.unet, unet_inputs), reference)
    assert torch.equal(_out(pipe.unet, unet_inputs), policy)  # re-enabled on exit


def test_saved_lora_with_alpha_not_rank_reloads_in_a_fresh_pipeline(
        pipe, tiny_sd_dir, unet_inputs, tmp_path, perturb_lora):
    add_lora(pipe.unet, LoRAConfig(rank=4, alpha=16.0))  # scaling α/r = 4, not the default 1
    perturb_lora(pipe.unet, scale=0.1)
    policy = _out(pipe.unet, unet_inputs)
    save_lora_diffusers(pipe, tmp_path / "lora")

    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pretrained = _out(fresh.unet, unet_inputs)
    fresh.load_lora_weights(tmp_path / "lora")
    scalings = {s for m in fresh.unet.modules() if isinstance(m, LoraLayer)
                for s in m.scaling.values()}
    assert scalings == {4.0}  # the metadata carried α; without it the loader would use α = r
    reloaded = _out(fresh.unet, unet_inputs)
    assert (policy - pretrained).abs().max() > 1e-2  # a wrong scaling could not pass unnoticed
    # Same weights, same scaling; 1e-6 only allows float32 reassociation in the loader's layers
    # (outputs are O(1), so 1e-6 is ~10 ulp), while a lost α (×4 on the delta) is off by > 1e-2.
    assert (reloaded - policy).abs().max() < 1e-6


def test_same_unet_saved_alone(pipe, tiny_sd_dir, unet_inputs, tmp_path, perturb_lora):
    add_lora(pipe.unet, LoRAConfig(rank=2, alpha=3.0, target_modules=["to_q", "to_v"]))
    perturb_lora(pipe.unet, seed=3)
    save_lora_diffusers(pipe.unet, tmp_path / "lora")  # a bare UNet: SD's saver
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    fresh.load_lora_weights(tmp_path / "lora")
    # Tolerance as above: identical weights and scaling, float32 reassociation only.
    assert (_out(fresh.unet, unet_inputs) - _out(pipe.unet, unet_inputs)).abs().max() < 1e-6


def test_state_dict_round_trip_is_exact(pipe, tiny_sd_dir, unet_inputs, perturb_lora):
    cfg = LoRAConfig(rank=4, alpha=2.0)
    add_lora(pipe.unet, cfg)
    perturb_lora(pipe.unet, seed=5)
    sd = lora_state_dict(pipe.unet)
    assert sd and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
    assert all(".lora.down." in k or ".lora.up." in k for k in sd)  # diffusers-format keys
    assert len(sd) == len(lora_parameters(pipe.unet))

    copy = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    add_lora(copy.unet, cfg)
    load_lora_state_dict(copy.unet, sd)
    # A plain copy of float32 tensors: exact equality, of the weights and of the outputs.
    for a, b in zip(lora_parameters(pipe.unet), lora_parameters(copy.unet)):
        assert torch.equal(a, b)
    assert torch.equal(_out(copy.unet, unet_inputs), _out(pipe.unet, unet_inputs))
    assert all(p.requires_grad for p in lora_parameters(copy.unet))


def test_state_dict_for_another_config_is_refused(pipe, tiny_sd_dir):
    add_lora(pipe.unet, LoRAConfig(target_modules=["to_q"]))
    copy = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    add_lora(copy.unet)  # also to_k, to_v, to_out.0: those would silently keep stale weights
    with pytest.raises(ValueError, match="does not match"):
        load_lora_state_dict(copy.unet, lora_state_dict(pipe.unet))


def test_state_dict_needs_an_adapter(pipe):
    with pytest.raises(ValueError, match="add_lora"):
        lora_state_dict(pipe.unet)
