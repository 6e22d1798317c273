"""The SD3 family on the tiny-sd3 preset: it loads like a real StableDiffusion3Pipeline folder, the
Denoiser turns the transformer's velocity into ε on the VP-equivalent path (common/flow_matching.py),
the flow-SDE sampler at η = 0 is the pipeline's own FlowMatchEuler sampling, the LoRA round-trips
through StableDiffusion3Pipeline, and g_φ takes SD3's pooled conditioning."""
import pytest
import torch
from lora_checks import assert_lora_round_trip  # tests/common/models/lora_checks.py

from nablagfn.common.config import FlowNetConfig, LoRAConfig, ModelConfig
from nablagfn.common.flow_matching import alpha_bar_from_sigma, eps_from_velocity, sigma_from_alpha_bar, to_native
from nablagfn.common.models import Denoiser, FlowNet, add_lora, load_pipeline
from nablagfn.common.models.text_conditioning import unpack_pooled
from nablagfn.common.schedule import make_schedule
from nablagfn.common.trajectories import sample_trajectories

PROMPTS = ["a cat", "the dog on a mat"]
SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sd3_cache")


@pytest.fixture
def pipe(cache_dir):
    return load_pipeline(ModelConfig(pretrained="tiny", family="sd3"), cache_dir=cache_dir)


def _perturb(net, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if ".lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def test_preset_is_a_stable_diffusion_3_folder(pipe, cache_dir):
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.unet is pipe.transformer
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    index = json.loads((cache_dir / "tiny-sd3" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"  # loadable by plain diffusers
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    d = Denoiser.from_pipeline(pipe)
    assert d.prediction_type == "flow" and d.is_transformer


def test_prompts_encode_as_the_pipeline_encodes_them(pipe):
    d = Denoiser.from_pipeline(pipe)
    packed = d.encode_prompts(PROMPTS)
    hidden, pooled = unpack_pooled(packed, d.text.pooled_dim)
    ref_h, _, ref_p, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert hidden.shape == (2, 77 + 256, 64) and pooled.shape == (2, 64)
    assert torch.equal(hidden, ref_h) and torch.equal(pooled, ref_p)


def test_eps_is_the_velocity_converted_at_the_native_state(pipe):
    """ε̂ = x_t + (1 − t) v̂ with v̂ the transformer at x_t = c_t x̃ and timestep t·1000, under CFG
    (guidance on ε = guidance on v: ε is affine in v with the same x_t). 5e-5: one batched call vs
    two (float32 kernels block by batch size), amplified by the guidance weights."""
    d = Denoiser.from_pipeline(pipe)
    cond, uncond = d.encode_prompts(PROMPTS), d.encode_prompts([""])
    sched = make_schedule(dict(pipe.scheduler.config), 10, "flow_sde")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2,) + SHAPE, generator=g)
    t = sched.timesteps[[1, 7]]
    sig = t / 1000
    assert torch.allclose(d.alpha_bar(t), alpha_bar_from_sigma(sig)) and torch.allclose(d.alpha_bar(t), sched.alpha_bar[[1, 7]])
    with torch.no_grad():
        eps = d.eps(x, t, cond, uncond, guidance_scale=4.0)
        xn = to_native(x, sig)
        h, p = unpack_pooled(cond, 64)
        hu, pu = unpack_pooled(uncond.expand(2, -1, -1), 64)
        v_c = pipe.transformer(hidden_states=xn, timestep=t.float(), encoder_hidden_states=h, pooled_projections=p).sample
        v_u = pipe.transformer(hidden_states=xn, timestep=t.float(), encoder_hidden_states=hu, pooled_projections=pu).sample
    want = eps_from_velocity(v_u + 4.0 * (v_c - v_u), xn, sig)
    assert (eps - want).abs().max() < 5e-5


def test_flow_sde_sampler_at_eta_zero_is_the_sd3_pipeline(pipe):
    """With η = 0 the flow-SDE MDP is the Euler ODE: on the same noise levels (the pipeline's
    `sigmas`, which it shifts as we do), starting from the same noise, our x̃_N · c_N equals
    StableDiffusion3Pipeline's latents after N steps (its own prompt encoding, CFG on v).
    Tolerance 1e-3 on latents up to ~4 (measured 2.6e-4): float32 round-off, largest at the first
    state where ε̂ = x_t + (1 − t) v̂ carries v̂ at a scale 1 − t = 3e-4 and CFG amplifies it."""
    add_lora(pipe.transformer)
    _perturb(pipe.transformer)
    d = Denoiser.from_pipeline(pipe)
    N, W = 5, 4.0
    sched = make_schedule(dict(pipe.scheduler.config), N, "flow_sde")
    sig = sigma_from_alpha_bar(sched.alpha_bar)
    tr = sample_trajectories(d, sched, d.encode_prompts(PROMPTS), d.encode_prompts([""]), W, "flow_sde", 0.0,
                             torch.Generator().manual_seed(5))
    x0_native = to_native(tr.states[:, 0], sig[0].expand(2))
    seen = {}

    def grab(p, i, t, kwargs):
        seen[i] = kwargs["latents"].clone()
        return kwargs

    tau = [(1000 - 1 - i * 998 / N) / 1000 for i in range(N + 1)]
    pipe(PROMPTS, sigmas=tau, guidance_scale=W, latents=x0_native, output_type="latent",
         callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
    ours = to_native(tr.final, sig[-1].expand(2))
    assert torch.allclose(ours, seen[N - 1], atol=1e-3)
    # a control: another guidance weight moves the pipeline's latents far beyond that tolerance
    pipe(PROMPTS, sigmas=tau, guidance_scale=W + 1, latents=x0_native, output_type="latent",
         callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
    assert (ours - seen[N - 1]).abs().max() > 1e-2


def test_lora_round_trips_through_stable_diffusion_3_pipeline(pipe, cache_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    cfg = LoRAConfig(rank=4, alpha=8.0)
    add_lora(pipe.unet, cfg)
    _perturb(pipe.unet, seed=2)
    assert_lora_round_trip(pipe, StableDiffusion3Pipeline, cache_dir / "tiny-sd3", "sd3", cache_dir, cfg,
                           torch.randn((2,) + SHAPE, generator=torch.Generator().manual_seed(1)), torch.tensor([900.5, 120.25], dtype=torch.float64), 4.0, PROMPTS, tmp_path)


def test_flow_net_takes_sd3_conditioning(pipe):
    d = Denoiser.from_pipeline(pipe)
    cond = d.encode_prompts(PROMPTS)
    x = torch.randn((2,) + SHAPE, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([990.0, 300.0])
    net = FlowNet.from_pipeline(FlowNetConfig(block_out_channels=[32, 64], prompt_conditioned=True), pipe)
    assert net.unet.config.class_embed_type == "projection" and net.cross_attention_dim == 64
    assert net.unet.config.in_channels == 16
    with torch.no_grad():
        assert float(net(x, t, cond).abs().max()) == 0
        torch.nn.init.normal_(net.unet.conv_out.weight, std=0.1)
        base = net(x, t, cond)
        pooled = cond.clone()
        pooled[:, -1] += 1.0
        assert (net(x, t, pooled) - base).abs().max() > 1e-4


def test_trainer_lora_reloads_in_the_sd3_pipeline_to_its_final_samples(cache_dir, tmp_path):
    """`nablagfn train --preset tiny-sd3` (shrunk to 2 updates): the saved LoRA, loaded with plain
    StableDiffusion3Pipeline.load_lora_weights, drives the flow-SDE sampler to the trainer's final
    evaluation samples (same eval seed, prompts, η = 1). 1e-4: float32 round-off of the same ops."""
    import json

    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from nablagfn.cli import main

    run = tmp_path / "run"
    assert main(["train", "--mode", "local", "--preset", "tiny-sd3", "--updates", "2", "--seed", "1",
                 "--run-dir", str(run), "--no-progress", f"model_cache_dir={cache_dir}", "sampler.num_steps=4",
                 "batch_trajectories=3", "train_batch_trajectories=0", "eval_trajectories=3", "grid_size=3",
                 "flow_net.block_out_channels=[32]"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "report.json").read_text())  # the end-of-run report reads SD3's LoRA file too
    assert "error" not in report and (run / "samples_final.png").is_file()
    end = load_file(str(run / "samples_end.safetensors"))["latents"]
    start = load_file(str(run / "samples_start.safetensors"))["latents"]
    assert (end - start).abs().max() > 1e-3
    pipe = StableDiffusion3Pipeline.from_pretrained(cache_dir / "tiny-sd3")
    pipe.load_lora_weights(run / "lora")
    d = Denoiser.from_pipeline(pipe)
    sched = make_schedule(dict(pipe.scheduler.config), 4, "flow_sde")
    with torch.no_grad():
        tr = sample_trajectories(d, sched, d.encode_prompts(summary["eval_prompts"]), d.encode_prompts([""]), 5.0,
                                 "flow_sde", 1.0, torch.Generator().manual_seed(summary["eval_seed"]))
    assert torch.allclose(tr.final, end, atol=1e-4, rtol=1e-4)
