"""The checkpoints of a training run directory, and reading their LoRA weights.

A run dir (learner/local_trainer.py) holds `lora/` (the LoRA after the last update) and, with
`checkpoint_every > 0`, `checkpoints/update_<n>/` (the LoRA after update n, with checkpoint.json
{"update": n}); both in diffusers format (`pytorch_lora_weights.safetensors`, keys `unet.*`).
`find_checkpoints` lists them by update, the pretrained model first as update 0 (path None: the
adapter disabled), and `lora/` as the final update (summary.json's `updates`) unless a numbered
checkpoint of that update exists. Folders that are being written (`.update_<n>.tmp`) are skipped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
_UPDATE_DIR = re.compile(r"^update_(\d+)$")


class CheckpointError(ValueError):
    """A run dir or checkpoint is missing or malformed; the message names the path."""


@dataclass(frozen=True)
class Checkpoint:
    update: int
    path: Optional[Path]  # a diffusers LoRA folder; None = the pretrained model (adapter disabled)

    @property
    def label(self) -> str:
        return "pretrained" if self.path is None else str(self.path)


def _final_update(run_dir: Path, cfg_updates: int) -> int:
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            return int(json.loads(summary.read_text())["updates"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{summary}: unreadable ({exc})") from None
    return int(cfg_updates)


def find_checkpoints(run_dir: str | Path, cfg_updates: int) -> list[Checkpoint]:
    """[pretrained (update 0), checkpoints by update..., final lora/] of `run_dir` (module docstring)."""
    run_dir = Path(run_dir)
    found: dict[int, Path] = {}
    ckpt_root = run_dir / "checkpoints"
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            m = _UPDATE_DIR.match(d.name)
            if not m or not d.is_dir():
                continue
            meta = d / "checkpoint.json"
            if not (d / LORA_FILE).is_file() or not meta.is_file():
                raise CheckpointError(f"{d}: a checkpoint needs {LORA_FILE} and checkpoint.json")
            update = int(json.loads(meta.read_text())["update"])
            if update != int(m.group(1)):
                raise CheckpointError(f"{meta}: update {update} does not match the folder name {d.name}")
            found[update] = d
    final = run_dir / "lora"
    if (final / LORA_FILE).is_file():
        found.setdefault(_final_update(run_dir, cfg_updates), final)
    if not found:
        raise CheckpointError(f"{run_dir}: no LoRA to evaluate (neither lora/{LORA_FILE} nor "
                              "checkpoints/update_<n>/): has the run finished an update?")
    return [Checkpoint(0, None)] + [Checkpoint(u, found[u]) for u in sorted(found) if u != 0]


DENOISER_PREFIXES = ("unet.", "transformer.")  # how diffusers names the denoiser in a LoRA file


def read_lora_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """The denoiser's LoRA state dict of a diffusers LoRA folder, its `unet.` / `transformer.` prefix
    removed (the keys `common.models.load_lora_state_dict` takes)."""
    from safetensors.torch import load_file

    f = Path(path) / LORA_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {LORA_FILE} (not a diffusers LoRA folder)")
    sd = load_file(str(f))
    for prefix in DENOISER_PREFIXES:  # the UNet's (SD, SDXL), or SD3's transformer's
        weights = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
        if weights:
            return weights
    raise CheckpointError(f"{f}: no denoiser LoRA weights (keys starting with {' or '.join(DENOISER_PREFIXES)})")
