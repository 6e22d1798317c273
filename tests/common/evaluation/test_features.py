"""Feature extractors (common/evaluation/features.py): CLIP embeddings from a local tiny CLIP dir
equal the model's own get_image_features, the registry resolves names and dotted paths, and the
default held-out prompts (heldout.py) are disjoint from the training lists."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rewards_service"))
from reward_fixtures import clip_image_features, tiny_clip, write_tokenizer_files  # noqa: E402

from nablagfn.common.evaluation import (DreamSimFeatures, FeatureError, HeldoutError, build_feature_extractor,  # noqa: E402
                                        dreamsim_available, extract_features, heldout_prompts,
                                        resolve_features)
from nablagfn.common.evaluation.heldout import HELDOUT_SPLITS  # noqa: E402
from nablagfn.common.prompts import BUILTIN_SOURCES  # noqa: E402
from nablagfn.rewards_service.rewards.preprocess import clip_preprocess  # noqa: E402


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("feat_clip")
    tok = write_tokenizer_files(d)
    tiny_clip(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d, tiny_clip(tok)


def mean_colour_features(model_path, device):
    """A dotted-path factory: per-channel means as a 3-d feature."""
    return lambda images: images.mean(dim=(2, 3))


def test_clip_features_equal_the_models_own_image_features(clip_dir):
    d, reference = clip_dir
    ext = build_feature_extractor("clip", d)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = ext(images)
    want = clip_image_features(reference, clip_preprocess(images, 32))
    assert got.shape == (3, 16) and ext.name == "clip"
    # atol 1e-5: the same float32 weights (saved and reloaded) and the same preprocessing; only the
    # vision-only loading path differs, which computes the identical ops (measured: bit-identical).
    assert torch.allclose(got, want, atol=1e-5)
    # 1-channel images are repeated to RGB
    gray = images[:, :1]
    assert torch.allclose(ext(gray), ext(gray.expand(-1, 3, -1, -1)), atol=1e-6)
    # chunked extraction gives the same rows
    assert torch.allclose(extract_features(ext, images, batch_size=2), got, atol=1e-6)


def test_registry_names_and_dotted_paths(clip_dir):
    assert resolve_features("auto")[0] == ("dreamsim" if dreamsim_available() else "clip")
    ext = build_feature_extractor(f"{__name__}:mean_colour_features")
    images = torch.rand(2, 3, 4, 4)
    assert torch.allclose(ext(images), images.mean(dim=(2, 3)))
    with pytest.raises(FeatureError, match="unknown name 'nope'"):
        build_feature_extractor("nope")
    with pytest.raises(FeatureError, match="features_model_path"):
        build_feature_extractor("clip", None)
    with pytest.raises(FeatureError, match="no config.json"):
        build_feature_extractor("clip", clip_dir[0] / "missing")


def test_without_dreamsim_auto_is_clip_and_dreamsim_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dreamsim", None)  # `import dreamsim` raises ImportError
    assert not dreamsim_available() and resolve_features("auto")[0] == "clip"
    with pytest.raises(FeatureError, match="dreamsim package does not import"):
        build_feature_extractor("dreamsim")


class _EmbedRecorder(torch.nn.Module):
    """Stands in for the DreamSim model (its weights cannot be downloaded here): `embed` records the
    input DreamSim would see and returns a fixed linear embedding of it."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 5, dtype=torch.float64)
        self.seen = None

    def embed(self, x):
        self.seen = x
        return self.proj(x.mean(dim=(2, 3)).double())


def test_dreamsim_adapter_feeds_embed_224_rgb_in_unit_range():
    """DreamSimFeatures' own part: grey → RGB, bicubic resize to 224×224, clamp to [0, 1], float32
    output of `embed`; a 224 input is passed through unchanged (exact)."""
    model = _EmbedRecorder()
    feats = DreamSimFeatures(model)
    grey = torch.linspace(-0.2, 1.2, 2 * 1 * 16 * 16).view(2, 1, 16, 16)
    out = feats(grey)
    assert model.seen.shape == (2, 3, 224, 224) and out.shape == (2, 5) and out.dtype == torch.float32
    assert float(model.seen.min()) >= 0 and float(model.seen.max()) <= 1
    assert torch.equal(model.seen[:, 0], model.seen[:, 2])  # grey replicated to three channels
    exact = torch.rand(1, 3, 224, 224)
    feats(exact)
    assert torch.equal(model.seen, exact)
    assert not any(p.requires_grad for p in feats.parameters())


def test_a_misbehaving_extractor_is_caught():
    with pytest.raises(FeatureError, match=r"must return \(B, D\)"):
        extract_features(lambda images: images.mean(), torch.rand(2, 3, 4, 4))
    with pytest.raises(FeatureError, match="NaN"):
        extract_features(lambda images: torch.full((images.shape[0], 2), float("nan")), torch.rand(2, 3, 4, 4))


def test_heldout_splits_are_disjoint_from_training_lists():
    for name, held in HELDOUT_SPLITS.items():
        if name == "none":
            continue
        assert len(held) >= 8 and len(set(held)) == len(held)
        trained = set().union(*(BUILTIN_SOURCES[s] for s in BUILTIN_SOURCES if s != "none"))
        assert not set(held) & trained, name
    assert heldout_prompts("animals")[0] == "owl"
    with pytest.raises(HeldoutError, match="--prompts"):
        heldout_prompts("/some/prompts.txt")
