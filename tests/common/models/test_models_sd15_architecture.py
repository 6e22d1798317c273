"""The hand-written SD1.5 architecture (sd15-random preset) has SD1.5's exact parameter counts.

Built on the meta device: no memory, no weights, so the full-size check costs seconds on CPU.
"""
import pytest
import torch

from nablagfn.common.config import ModelConfig
from nablagfn.common.models import ModelLoadError
from nablagfn.common.models.loading import resolve_pretrained
from nablagfn.common.models.sd15_architecture import SD15_PARAMETER_COUNTS, sd15_modules


def test_parameter_counts_match_the_published_model():
    with torch.device("meta"):
        unet, vae, text = sd15_modules()
    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}
    assert counts == SD15_PARAMETER_COUNTS
    assert unet.config.sample_size * 8 == vae.config.sample_size == 512  # 512² images, 64² latents


def test_sd15_random_has_no_other_family(tmp_path):
    with pytest.raises(ModelLoadError, match="sd15-random.*'sdxl'"):
        resolve_pretrained(ModelConfig(pretrained="sd15-random", family="sdxl"), cache_dir=tmp_path)
