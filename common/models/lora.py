"""The LoRA policy: a peft adapter on the pretrained UNet, and its (de)serialisation.

The policy ε_θ and the pretrained ε# share one UNet: ε# is the same module with the adapter
disabled, so no second copy of the frozen weights is held (ALGORITHM.md §2). Versions of the policy
are published as diffusers-format LoRA state dicts (float32, on CPU) and applied to policy copies
with `load_lora_state_dict`; `save_lora_diffusers` writes a folder that plain
`pipe.load_lora_weights(dir)` reloads exactly, adapter metadata included (without it a
lora_alpha ≠ r is silently lost on reload — STACK.md).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from ..config import LoRAConfig

ADAPTER = "default"


def add_lora(unet, cfg: LoRAConfig | None = None,
             adapter_name: str = ADAPTER) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter (float32, trainable) to `unet`; return its parameters.

    peft initialises lora_B to zero, so the policy starts exactly at the pretrained model.
    """
    from peft import LoraConfig

    cfg = cfg or LoRAConfig()
    cfg.validate()
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights=True,
                                target_modules=list(cfg.target_modules)), adapter_name=adapter_name)
    params = lora_parameters(unet)
    if not params:
        raise ValueError(f"LoRA target_modules {cfg.target_modules} matched no module of the UNet")
    for p in params:  # trainable weights stay float32 even when the frozen ones are half
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    """The LoRA parameters of `unet` (every `lora_` tensor of its peft layers)."""
    return [p for n, p in unet.named_parameters() if ".lora_" in n]


def _require_adapter(unet) -> None:
    if not getattr(unet, "peft_config", None):
        raise ValueError("the UNet has no LoRA adapter: call add_lora(unet, cfg) first")


def adapters_enabled(unet) -> bool:
    """Whether the peft layers of `unet` currently apply their adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in unet.modules():
        if isinstance(m, BaseTunerLayer):
            return not m.disable_adapters
    return False


@contextlib.contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """Within the block `unet` computes the pretrained ε# exactly; the prior state is restored."""
    if not getattr(unet, "peft_config", None):  # no adapter: it already is the pretrained model
        yield
        return
    was_enabled = adapters_enabled(unet)
    unet.disable_adapters()
    try:
        yield
    finally:
        if was_enabled:
            unet.enable_adapters()


def lora_state_dict(unet, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers-format keys, as detached float32 CPU copies."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    _require_adapter(unet)
    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}  # get_peft_model wrapping
    if _has_text_attention(unet):  # SD's renaming covers attention only: pixel UNets keep peft keys
        sd = convert_state_dict_to_diffusers(sd)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def _has_text_attention(unet) -> bool:
    return getattr(unet.config, "cross_attention_dim", None) is not None


def load_lora_state_dict(unet, state_dict: dict[str, torch.Tensor],
                         adapter_name: str = ADAPTER) -> None:
    """Copy a `lora_state_dict` output into the adapter of `unet` (same LoRAConfig); exact."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    _require_adapter(unet)
    sd = convert_unet_state_dict_to_peft(dict(state_dict))
    result = set_peft_model_state_dict(unet, sd, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"LoRA state dict does not match the UNet's adapter {adapter_name!r} "
                         f"(different LoRAConfig?): unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}")


def save_lora_diffusers(pipe_or_unet, out_dir: str | Path, adapter_name: str = ADAPTER) -> Path:
    """Write the adapter so that `<Pipeline>.load_lora_weights(out_dir)` reproduces the policy.

    Uses the pipeline's own `save_lora_weights` (StableDiffusionPipeline's for a bare UNet,
    StableDiffusion3Pipeline's for a bare SD3 transformer) with the adapter metadata (rank, alpha,
    targets), which the loader needs to rebuild the same scaling.
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    is_pipe = hasattr(pipe_or_unet, "save_lora_weights")
    is_transformer = hasattr(unet.config, "joint_attention_dim")  # SD3's MMDiT
    saver = type(pipe_or_unet) if is_pipe else (StableDiffusion3Pipeline if is_transformer else StableDiffusionPipeline)
    _require_adapter(unet)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # SD3-style pipelines name the network "transformer" (keys "transformer.<peft key>"), the rest "unet"
    name = "transformer" if "transformer" in getattr(saver, "_lora_loadable_modules", ()) else "unet"
    saver.save_lora_weights(out_dir, **{f"{name}_lora_layers": lora_state_dict(unet, adapter_name),
                                        f"{name}_lora_adapter_metadata": unet.peft_config[adapter_name].to_dict()})
    return out_dir
