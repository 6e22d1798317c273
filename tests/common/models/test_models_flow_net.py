"""g_φ: exactly zero at init, trainable, and prompt-blind unless prompt_conditioned."""
import pytest
import torch

from nablagfn.common.config import FlowNetConfig
from nablagfn.common.config_io import ConfigError
from nablagfn.common.models import FlowNet


@pytest.fixture
def inputs(unet_inputs):
    x, t, emb = unet_inputs
    return x.requires_grad_(True), t, emb


def test_default_flow_net_is_zero_at_init_and_trains(pipe, inputs):
    x, t, emb = inputs
    net = FlowNet.from_pipeline(FlowNetConfig(), pipe)  # widths 64, 128, 256, 256
    assert [b.resnets[0].out_channels for b in net.unet.down_blocks] == [64, 128, 256, 256]
    assert net.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    g = net.flow(x, t, emb)
    assert g.shape == x.shape and g.dtype == torch.float32
    assert torch.equal(g, torch.zeros_like(g))  # zero output conv: exactly 0, no tolerance
    target = torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
    ((g - target) ** 2).sum().backward()
    grad = net.unet.conv_out.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the output layer learns from step one
    torch.optim.SGD(net.parameters(), lr=1e-2).step()
    net.zero_grad()
    g2 = net.flow(x.detach(), t, emb)
    assert g2.abs().max() > 0
    g2.pow(2).sum().backward()  # once conv_out ≠ 0 the gradient reaches the whole network
    inner = net.unet.down_blocks[0].resnets[0].conv1.weight.grad
    assert inner is not None and inner.abs().sum() > 0


def _randomised(cfg, pipe):
    with torch.random.fork_rng(devices=[]):  # reproducible, without touching the global RNG
        torch.manual_seed(0)
        net = FlowNet.from_pipeline(cfg, pipe)
        torch.nn.init.normal_(net.unet.conv_out.weight, std=0.1)  # leave the zero init behind
    return net


def test_prompt_independent_flow_ignores_the_text(pipe, inputs):
    x, t, emb = inputs
    net = _randomised(FlowNetConfig(block_out_channels=[32, 64], prompt_conditioned=False), pipe)
    with torch.no_grad():
        a, b, c = net.flow(x, t, emb), net.flow(x, t, emb.flip(0)), net.flow(x, t, None)
    # The text input is replaced by the same zeros each time: identical ops, so bit-identical.
    assert a.abs().max() > 0 and torch.equal(a, b) and torch.equal(a, c)


def test_prompt_conditioned_flow_uses_the_text(pipe, inputs):
    x, t, emb = inputs
    net = _randomised(FlowNetConfig(block_out_channels=[32, 64], prompt_conditioned=True), pipe)
    with torch.no_grad():
        a, b = net.flow(x, t, emb), net.flow(x, t, emb.flip(0))
    assert (a - b).abs().max() > 1e-4  # different prompts, different flows
    with pytest.raises(ValueError, match="cond_emb"):
        net.flow(x, t, None)


def test_config_rejects_widths_groupnorm_cannot_split():
    with pytest.raises(ConfigError, match="block_out_channels"):
        FlowNetConfig(block_out_channels=[48, 64]).validate()
