"""The learner's checkpoint: everything a restarted learner needs to resume where it stopped.

A folder `<run_dir>/checkpoint/` holding
  lora.safetensors       the policy's LoRA (diffusers keys, float32)
  flow.safetensors       g_φ (residual DB: its log-flow head);  flow_bar.safetensors  g_φ's Polyak
                         copy (each absent when there is none)
  optimizer.pt           AdamW's state_dict (torch.save; loaded with weights_only=True)
  state.json             version, update count, counters, the trajectory ids already trained on
Written to a temporary sibling folder and swapped in with renames, so a crash mid-write leaves the
previous checkpoint intact. These files are local, written by this learner; nothing read from
Redis or a socket is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

NAME = "checkpoint"


@dataclass
class Checkpoint:
    lora: dict[str, torch.Tensor]
    flow: dict[str, torch.Tensor]
    flow_bar: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_checkpoint(run_dir: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Atomically replace `<run_dir>/checkpoint` with `ckpt`; returns its folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / NAME
    tmp = run_dir / f".{NAME}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_cpu(ckpt.lora), str(tmp / "lora.safetensors"))
        if ckpt.flow:
            save_file(_cpu(ckpt.flow), str(tmp / "flow.safetensors"))
        if ckpt.flow_bar:
            save_file(_cpu(ckpt.flow_bar), str(tmp / "flow_bar.safetensors"))
        torch.save(ckpt.optimizer, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(ckpt.state))
        old = run_dir / f".{NAME}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> Optional[Checkpoint]:
    """The checkpoint in `run_dir`, or None when there is none."""
    folder = Path(run_dir) / NAME
    if not (folder / "state.json").is_file():
        return None
    flow, flow_bar = folder / "flow.safetensors", folder / "flow_bar.safetensors"
    return Checkpoint(
        lora=load_file(str(folder / "lora.safetensors")),
        flow=load_file(str(flow)) if flow.is_file() else {},
        flow_bar=load_file(str(flow_bar)) if flow_bar.is_file() else {},
        optimizer=torch.load(folder / "optimizer.pt", map_location=map_location, weights_only=True),
        state=json.loads((folder / "state.json").read_text()))
