"""Pretrained pipelines, the LoRA policy, the guided ε wrapper and the flow network g_φ.

Heavy imports (diffusers, transformers, peft) happen inside the functions, so importing this
package stays cheap for processes that never touch a real model.
"""
from .denoiser import Denoiser
from .flow_net import FlowNet
from .loading import PIPELINE_CLASSES, PRESETS, ModelLoadError, load_pipeline, resolve_pretrained
from .lora import (adapters_disabled, add_lora, load_lora_state_dict, lora_parameters,
                   lora_state_dict, save_lora_diffusers)
from .tiny import TINY_BUILDERS, build_tiny_pipeline, build_tiny_sd_pipeline

__all__ = [
    "Denoiser", "FlowNet", "ModelLoadError", "PIPELINE_CLASSES", "PRESETS", "TINY_BUILDERS",
    "adapters_disabled", "add_lora", "build_tiny_pipeline", "build_tiny_sd_pipeline",
    "load_lora_state_dict", "load_pipeline", "lora_parameters", "lora_state_dict",
    "resolve_pretrained", "save_lora_diffusers",
]
