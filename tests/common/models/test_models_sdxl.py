"""The SDXL family on the tiny-sdxl preset: it loads like a real StableDiffusionXLPipeline folder, the
Denoiser and the sampler take SDXL's conditioning (two text encoders, pooled embeddings, added time
ids) exactly as the pipeline does, the LoRA round-trips through StableDiffusionXLPipeline, and g_φ
takes the same conditioning."""
import pytest
import torch
from lora_checks import assert_lora_round_trip  # tests/common/models/lora_checks.py

from nablagfn.common.config import FlowNetConfig, LoRAConfig, ModelConfig
from nablagfn.common.models import Denoiser, FlowNet, add_lora, load_pipeline
from nablagfn.common.models.text_conditioning import unpack_pooled
from nablagfn.common.schedule import make_schedule
from nablagfn.common.trajectories import sample_trajectories

PROMPTS = ["a cat", "the dog on a mat", "an owl"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sdxl_cache")


@pytest.fixture
def pipe(cache_dir):
    """The tiny-sdxl preset through the production loader (built once into the cache)."""
    return load_pipeline(ModelConfig(pretrained="tiny", family="sdxl"), cache_dir=cache_dir)


@pytest.fixture
def perturb():
    def fn(unet, seed=0, scale=0.3):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if ".lora_" in n:
                    p.copy_(scale * torch.randn(p.shape, generator=g))
    return fn


def test_preset_is_a_stable_diffusion_xl_folder(pipe, cache_dir):
    from diffusers import StableDiffusionXLPipeline

    assert type(pipe) is StableDiffusionXLPipeline
    assert (cache_dir / "tiny-sdxl" / "model_index.json").is_file()
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder_2.parameters())


def test_prompts_encode_as_the_pipeline_encodes_them(pipe):
    d = Denoiser.from_pipeline(pipe)
    packed = d.encode_prompts(PROMPTS + [""])
    hidden, pooled = unpack_pooled(packed, d.text.pooled_dim)
    ref_h, _, ref_p, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert hidden.shape == (4, 77, 64) and pooled.shape == (4, 32)
    # 1e-6: a batch of 4 prompts vs the pipeline's batch of 3 (CPU kernels block by batch size)
    assert torch.allclose(hidden[:3], ref_h, atol=1e-6) and torch.allclose(pooled[:3], ref_p, atol=1e-6)
    # force_zeros_for_empty_prompt: the CFG unconditional branch is zeros, as in the pipeline
    assert float(hidden[3].abs().max()) == 0 and float(pooled[3].abs().max()) == 0
    assert float(packed[:, -1, 32:].abs().max()) == 0  # the pooled token's padding


def test_guided_eps_is_the_unet_with_pooled_text_and_time_ids(pipe, perturb):
    add_lora(pipe.unet)
    perturb(pipe.unet)
    d = Denoiser.from_pipeline(pipe)
    cond, uncond = d.encode_prompts(PROMPTS), d.encode_prompts([""])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([981, 500, 21])
    eps = d.eps(x, t, cond, uncond, guidance_scale=5.0)
    h, p = unpack_pooled(cond, 32)
    hu, pu = unpack_pooled(uncond.expand(3, -1, -1), 32)
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(3, 6)  # (H, W, crop, H, W) of 32×32 images
    with torch.no_grad():
        e_c = pipe.unet(x, t, encoder_hidden_states=h, added_cond_kwargs={"text_embeds": p, "time_ids": ids}).sample
        e_u = pipe.unet(x, t, encoder_hidden_states=hu, added_cond_kwargs={"text_embeds": pu, "time_ids": ids}).sample
    # One batched call vs two: CPU kernels block by batch size, ~1e-5 per UNet output with a perturbed
    # LoRA, amplified by |1 − w| + |w| = 9 (measured 2e-4); a wrong formula or order is off by O(1).
    assert (eps - (e_u + 5.0 * (e_c - e_u))).abs().max() < 5e-4
    with torch.no_grad():
        other = pipe.unet(x, t, encoder_hidden_states=h, added_cond_kwargs={"text_embeds": p, "time_ids": 2 * ids}).sample
    assert (other - e_c).abs().max() > 1e-4  # the time ids do reach the UNet


def test_sampler_is_the_sdxl_pipeline(pipe, perturb):
    """The MDP sampler with DDIM η = 1 and CFG draws what StableDiffusionXLPipeline draws with the same
    generator (its own prompt encoding, zero negative embeddings, default time ids), for the policy
    (LoRA on) — 1e-4 on latents of scale ~1: float32 round-off of the same ops."""
    add_lora(pipe.unet)
    perturb(pipe.unet)
    d = Denoiser.from_pipeline(pipe)
    N, W = 4, 5.0
    sched = make_schedule(dict(pipe.scheduler.config), N, "ddim")
    tr = sample_trajectories(d, sched, d.encode_prompts(PROMPTS), d.encode_prompts([""]), W, "ddim", 1.0,
                             torch.Generator().manual_seed(7))
    ref = pipe(PROMPTS, num_inference_steps=N, guidance_scale=W, eta=1.0, output_type="latent",
               generator=torch.Generator().manual_seed(7)).images
    assert torch.allclose(tr.final, ref, atol=1e-4, rtol=1e-4)


def test_lora_round_trips_through_stable_diffusion_xl_pipeline(pipe, cache_dir, perturb, tmp_path):
    """Saved in the diffusers SDXL format (alpha ≠ rank: the metadata must travel) and reloaded with
    StableDiffusionXLPipeline.load_lora_weights: bit-identical ε; the state-dict path too."""
    from diffusers import StableDiffusionXLPipeline

    cfg = LoRAConfig(rank=4, alpha=8.0)
    add_lora(pipe.unet, cfg)
    perturb(pipe.unet, seed=3)
    assert_lora_round_trip(pipe, StableDiffusionXLPipeline, cache_dir / "tiny-sdxl", "sdxl", cache_dir, cfg,
                           torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([900, 400, 1]), 5.0, PROMPTS, tmp_path)


def test_flow_net_takes_sdxl_conditioning(pipe):
    d = Denoiser.from_pipeline(pipe)
    cond = d.encode_prompts(PROMPTS)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([981, 500, 21])
    # two widths: at 32 channels with 32 GroupNorm groups each group is one channel, and GroupNorm
    # removes any per-channel embedding (time, pooled text) — the 64-wide block carries them
    net = FlowNet.from_pipeline(FlowNetConfig(block_out_channels=[32, 64], prompt_conditioned=True), pipe)
    assert net.unet.config.addition_embed_type == "text_time" and net.cross_attention_dim == 64
    with torch.no_grad():
        assert float(net(x, t, cond).abs().max()) == 0  # zero at init
    torch.nn.init.normal_(net.unet.conv_out.weight, std=0.1)
    base = net(x, t, cond)
    pooled_only = cond.clone()
    pooled_only[:, -1, :32] += 1.0  # change the pooled embedding alone
    hidden_only = cond.clone()
    hidden_only[:, :-1] += 1.0
    assert (net(x, t, pooled_only) - base).abs().max() > 1e-4
    assert (net(x, t, hidden_only) - base).abs().max() > 1e-4
    plain = FlowNet.from_pipeline(FlowNetConfig(block_out_channels=[32, 64]), pipe)
    torch.nn.init.normal_(plain.unet.conv_out.weight, std=0.1)
    assert torch.equal(plain(x, t, cond), plain(x, t, pooled_only))  # prompt-independent: text ignored


def test_trainer_lora_reloads_in_the_sdxl_pipeline_to_its_final_samples(cache_dir, tmp_path):
    """`nablagfn train --preset tiny-sdxl` (shrunk to 2 updates): the saved LoRA, loaded with plain
    StableDiffusionXLPipeline.load_lora_weights, makes the pipeline's own DDIM η = 1 sampling draw the
    trainer's final evaluation samples (same eval seed and prompts). 1e-4 on latents of scale ~1:
    float32 round-off of the same ops; a lost α/r scaling or layer moves them by > 1e-2."""
    import json

    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from nablagfn.cli import main

    run = tmp_path / "run"
    assert main(["train", "--mode", "local", "--preset", "tiny-sdxl", "--updates", "2", "--seed", "1",
                 "--run-dir", str(run), "--no-progress", f"model_cache_dir={cache_dir}", "sampler.num_steps=4",
                 "batch_trajectories=3", "train_batch_trajectories=0", "eval_trajectories=3", "grid_size=3",
                 "flow_net.block_out_channels=[32]"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    end = load_file(str(run / "samples_end.safetensors"))["latents"]
    start = load_file(str(run / "samples_start.safetensors"))["latents"]
    assert (end - start).abs().max() > 1e-3  # the updates moved the policy
    pipe = StableDiffusionXLPipeline.from_pretrained(cache_dir / "tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run / "lora")
    got = pipe(summary["eval_prompts"], num_inference_steps=4, guidance_scale=5.0, eta=1.0, output_type="latent",
               generator=torch.Generator().manual_seed(summary["eval_seed"])).images
    assert torch.allclose(got, end, atol=1e-4, rtol=1e-4)


def test_sdxl_aesthetic_preset_is_the_authors_settings_on_sdxl():
    from nablagfn.cli import load_preset
    from nablagfn.common.config import TrainConfig
    from nablagfn.common.config_io import build_config, validate

    cfg = build_config(TrainConfig, load_preset("sdxl-aesthetic"))
    validate(cfg)
    assert cfg.model.family == "sdxl" and cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (cfg.objective.reward_scale, cfg.objective.unet_reg_scale, cfg.optim.lr) == (1e4, 1e3, 1e-3)
    assert (cfg.sampler.kind, cfg.sampler.num_steps, cfg.sampler.eta, cfg.sampler.guidance_scale) == ("ddim", 50, 1.0, 5.0)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.batch_trajectories, cfg.reward.name) == (8, 8.0, 64, "aesthetic")
