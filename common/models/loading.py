"""The one code path that turns a `ModelConfig` into a frozen diffusers pipeline.

`pretrained` is a local folder, a hub id, a preset name ("tiny"), or a model committed with the repo
("digits", bundled.py). A preset is first built into a
caller-given cache folder and then loaded with `from_pretrained` exactly like a real model, so tests
on the tiny preset exercise the production path. Every failure to find or load weights raises
`ModelLoadError` naming the path/id and what to do, instead of a deep diffusers/hub traceback.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..config import ModelConfig
from .bundled import BUNDLED_MODELS, BundledModelMissing, bundled_model_dir
from .sd15_architecture import build_sd15_random
from .tiny import TINY_BUILDERS, build_tiny_pipeline

PRESETS = {"tiny": 0, "sd15-random": 0}
"""Preset name → the seed its random weights are built from."""

FULL_SIZE_PRESETS = {("sd15-random", "sd"): build_sd15_random}
"""(preset, family) → builder of a full-size architecture with random weights (GPU benchmarks)."""

PIPELINE_CLASSES: dict[str, str | None] = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",  # pooled text + added time ids: text_conditioning.py
    "sd3": "StableDiffusion3Pipeline",  # loaded as sd3_pipeline.SD3Pipeline (unet = its transformer)
    "pixel": "DDPMPipeline",  # an unconditional UNet2DModel on pixels (common/models/pixel.py)
}
"""Model family → diffusers pipeline class name; None = a known family not supported yet."""

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """Pretrained weights could not be found or loaded; the message says which and what to do."""


def pipeline_class(family: str):
    """The diffusers pipeline class of `family`, or ModelLoadError if it is not supported (yet)."""
    import diffusers

    if family == "pixel":  # a DDPMPipeline folder, loaded with LoRA support and an identity VAE
        from .pixel import PixelDiffusionPipeline

        return PixelDiffusionPipeline
    if family == "sd3":  # a StableDiffusion3Pipeline folder; `unet` names its flow-matching transformer
        from .sd3_pipeline import SD3Pipeline

        return SD3Pipeline
    if family not in PIPELINE_CLASSES:
        raise ModelLoadError(f"unknown model family {family!r}; known: {sorted(PIPELINE_CLASSES)}")
    name = PIPELINE_CLASSES[family]
    if name is None:
        supported = sorted(k for k, v in PIPELINE_CLASSES.items() if v)
        raise ModelLoadError(f"model family {family!r} is not supported yet; use one of "
                             f"{supported}")
    return getattr(diffusers, name)


def weights_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """cfg.dtype on an accelerator; float32 on CPU (half-precision CPU kernels are slow/missing)."""
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if torch.device(device).type == "cpu" and dtype != "float32":
        warnings.warn(f"model.dtype={dtype} asked on CPU: loading the frozen weights in float32",
                      stacklevel=3)
        return torch.float32
    return _DTYPES[dtype]


def build_preset(name: str, family: str, cache_dir: str | Path | None) -> Path:
    """Build preset `name` for `family` into cache_dir/<name>-<family> once; return the folder.

    Built in a temporary sibling folder and renamed into place, so concurrent processes sharing a
    cache never see (or load) a half-written pipeline.
    """
    if cache_dir is None:
        raise ModelLoadError(f"model.pretrained={name!r} is a preset built on the fly: pass a "
                             "cache_dir (e.g. the run dir) to build it into")
    full_size = FULL_SIZE_PRESETS.get((name, family))
    if full_size is None and name in {n for n, _ in FULL_SIZE_PRESETS}:
        raise ModelLoadError(f"preset {name!r} has no {family!r} variant; available families: "
                             f"{sorted(f for n, f in FULL_SIZE_PRESETS if n == name)}")
    if full_size is None and family not in TINY_BUILDERS:
        raise ModelLoadError(f"preset {name!r} has no {family!r} variant; available families: "
                             f"{sorted(TINY_BUILDERS)}")
    target = Path(cache_dir) / f"{name}-{family}"
    if (target / "model_index.json").is_file():
        return target
    tmp = Path(cache_dir) / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if full_size is None:
        build_tiny_pipeline(family, tmp, seed=PRESETS[name])
    else:
        tmp.mkdir(parents=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESETS[name])
            full_size(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; its copy is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model_index.json").is_file():
            raise
    return target


def _is_hub_id(s: str) -> bool:
    """A hub id is "name" or "owner/name" and not an existing path; anything else is a folder."""
    return not s.startswith(("/", ".", "~")) and s.count("/") <= 1 and "\\" not in s \
        and not Path(s).exists()


def resolve_pretrained(cfg: ModelConfig, cache_dir: str | Path | None = None) -> str:
    """A loadable local folder or hub id for cfg.pretrained (building a preset if needed)."""
    if cfg.pretrained in PRESETS:
        return str(build_preset(cfg.pretrained, cfg.family, cache_dir))
    if cfg.pretrained in BUNDLED_MODELS:
        family = BUNDLED_MODELS[cfg.pretrained]["family"]
        if cfg.family != family:
            raise ModelLoadError(f"model.pretrained={cfg.pretrained!r} is a {family!r} model: set "
                                 f"model.family={family} (got {cfg.family!r})")
        try:
            path = bundled_model_dir(cfg.pretrained)
        except BundledModelMissing as exc:
            raise ModelLoadError(f"model.pretrained={cfg.pretrained!r}: {exc}") from None
        return resolve_pretrained(dataclasses.replace(cfg, pretrained=str(path)))
    if _is_hub_id(cfg.pretrained):
        return cfg.pretrained  # a hub id
    path = Path(cfg.pretrained).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model.pretrained={str(path)!r}: no such directory. Point it at a "
                             "diffusers pipeline folder (one with model_index.json), a hub id, "
                             f"or a preset {sorted(PRESETS)}")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"model.pretrained={str(path)!r} has no model_index.json: not a "
                             "diffusers pipeline folder (save one with pipe.save_pretrained)")
    found = json.loads(index.read_text()).get("_class_name")
    expected = PIPELINE_CLASSES.get(cfg.family)
    other = {v: k for k, v in PIPELINE_CLASSES.items() if v}.get(found)
    if expected and found and found != expected and other is not None:  # another known family's folder
        raise ModelLoadError(f"model.pretrained={str(path)!r} holds a {found} (model family {other!r}), "
                             f"not a {expected}: set model.family={other} (got {cfg.family!r})")
    if expected and found and found != expected:
        warnings.warn(f"{path} holds a {found}, loading it as {expected} (model.family="
                      f"{cfg.family!r})", stacklevel=3)
    return str(path)


def load_pipeline(cfg: ModelConfig, cache_dir: str | Path | None = None,
                  device: str | torch.device = "cpu"):
    """Load the pretrained pipeline of `cfg` on `device`, all weights frozen (requires_grad False).

    Frozen weights are in cfg.dtype on an accelerator and float32 on CPU; LoRA parameters added
    later (lora.add_lora) are float32 regardless.
    """
    cfg.validate()
    cls = pipeline_class(cfg.family)
    source = resolve_pretrained(cfg, cache_dir)
    dtype = weights_dtype(cfg.dtype, device)
    try:
        pipe = cls.from_pretrained(source, revision=cfg.revision, dtype=dtype,
                                   local_files_only=cfg.local_files_only)
    except Exception as e:  # hub/OS/config errors come in many types; all mean "cannot load"
        hint = ("it is not in the local hub cache: download it beforehand (`hf download "
                f"{source}`) or set model.local_files_only=false where the hub is reachable"
                if cfg.local_files_only and not Path(source).is_dir() else
                "check the id/revision, network access, and that it is a diffusers pipeline")
        raise ModelLoadError(f"could not load {cls.__name__} from {source!r}"
                             f"{f' (revision {cfg.revision})' if cfg.revision else ''}: "
                             f"{type(e).__name__}: {str(e).rstrip('.')}. Hint: {hint}") from e
    pipe.to(device)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
