"""sample_trajectories on the tiny SD pipeline: its records are what the model gives at its own states,
it is deterministic given the generator, and with DDIM it is diffusers' StableDiffusionPipeline."""
import pytest
import torch

from nablagfn.common.config import LoRAConfig, ModelConfig
from nablagfn.common.models import Denoiser, add_lora, load_pipeline
from nablagfn.common.prediction import x0_from_eps
from nablagfn.common.samplers import get_transition
from nablagfn.common.schedule import make_schedule
from nablagfn.common.trajectories import sample_trajectories

N = 4
W = 5.0
PROMPTS = ["a cat", "the dog on a mat", "an owl"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_dir):
    """The pipeline with a LoRA whose weights are random (lora_B = 0 would make policy = pretrained)."""
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_dir)))
    add_lora(pipe.unet, LoRAConfig(rank=4, alpha=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if ".lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    d = Denoiser.from_pipeline(pipe)
    cond, uncond = d.encode_prompts(PROMPTS), d.encode_prompts([""])
    sched = make_schedule(dict(pipe.scheduler.config), N, "ddim")
    return pipe, d, cond, uncond, sched


def _sample(setup, seed, **kw):
    pipe, d, cond, uncond, sched = setup
    return sample_trajectories(d, sched, cond, uncond, W, "ddim", 1.0, torch.Generator().manual_seed(seed), **kw)


def test_records_are_the_models_outputs_at_its_own_states(setup):
    pipe, d, cond, uncond, sched = setup
    tr = _sample(setup, 7)
    B = len(PROMPTS)
    assert tr.states.shape == (B, N + 1, 4, 16, 16)
    assert tr.eps.shape == tr.x0.shape == (B, N, 4, 16, 16)
    alpha = sched.alpha_bar.float()
    gen = torch.Generator().manual_seed(7)
    z0 = torch.randn(tr.states[:, 0].shape, generator=gen)
    assert torch.equal(tr.states[:, 0], z0)  # x_0 is the generator's first draw
    for i in range(N):
        x = tr.states[:, i]
        with torch.no_grad():
            eps = d.eps(x, sched.timesteps[i].expand(B), cond, uncond, W, adapter=True)
        # Same inputs, same batch, same ops: the recomputed ε is the recorded one up to float32
        # round-off (1e-5 absolute on ε of unit scale allows for a different kernel path).
        assert torch.allclose(eps, tr.eps[:, i], atol=1e-5, rtol=0)
        assert torch.allclose(x0_from_eps(tr.eps[:, i], x, alpha[i].expand(B)), tr.x0[:, i], atol=1e-4, rtol=1e-5)
        st = get_transition("ddim")(x, tr.eps[:, i], alpha[i].expand(B), alpha[i + 1].expand(B), 1.0)
        z = torch.randn(x.shape, generator=gen)  # the step's noise is the next draw
        assert torch.allclose(st.sample(z), tr.states[:, i + 1], atol=1e-5, rtol=1e-6)


def test_deterministic_given_the_generator(setup):
    a, b, c = _sample(setup, 3), _sample(setup, 3), _sample(setup, 4)
    for f in ("states", "eps", "x0"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.allclose(a.final, c.final)


def test_keep_idx_records_only_the_kept_steps(setup):
    full = _sample(setup, 5)
    keep = torch.tensor([[0, 3], [1, 3], [2, 3]])
    part = _sample(setup, 5, keep_idx=keep)
    assert torch.equal(part.states, full.states)
    rows = torch.arange(3)[:, None]
    assert torch.equal(part.eps, full.eps[rows, keep]) and torch.equal(part.x0, full.x0[rows, keep])
    with pytest.raises(ValueError, match="keep_idx"):
        _sample(setup, 5, keep_idx=torch.tensor([[0, N]] * 3))


def test_policy_is_diffusers_pipeline_and_adapter_off_is_pretrained(setup, tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe, d, cond, uncond, sched = setup
    tr = _sample(setup, 11)
    ref = pipe(PROMPTS, num_inference_steps=N, guidance_scale=W, eta=1.0,
               generator=torch.Generator().manual_seed(11), output_type="latent").images
    # Same noise draws in the same order, same ε and the DDIM step of test_samplers: only float32
    # round-off of two algebraically equal step formulas separates them (measured: bit-identical).
    assert torch.allclose(tr.final, ref, atol=1e-4, rtol=1e-5)

    pre = _sample(setup, 11, adapter=False)
    assert (pre.final - tr.final).abs().max() > 1e-2  # the LoRA changes the samples
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir)
    fresh.set_progress_bar_config(disable=True)
    ref_pre = fresh(PROMPTS, num_inference_steps=N, guidance_scale=W, eta=1.0,
                    generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert torch.allclose(pre.final, ref_pre, atol=1e-4, rtol=1e-5)
