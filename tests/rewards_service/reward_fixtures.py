"""Helpers of the reward tests: a tiny random CLIPModel + tokenizer built offline, checkpoints in
the public layouts, and float64 references. (A uniquely named module, not conftest, so that
`import` cannot pick another folder's conftest.)"""
import json

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

TEXT_LEN = 16  # tiny text tower: 16 positions


def write_tokenizer_files(d):
    """Byte-level BPE vocab (256 chars, the same with </w>, a few merges, start/end tokens)."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=TEXT_LEN)


def tiny_clip(tokenizer, seed=0):
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=TEXT_LEN,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval()


def public_laion_head_state(in_dim, seed=0):
    """A state dict in the improved-aesthetic-predictor layout, built key by key (not from our
    class)."""
    g = torch.Generator().manual_seed(seed)
    dims = {0: (in_dim, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}
    sd = {}
    for idx, (i, o) in dims.items():
        sd[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        sd[f"layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    return sd


def head_reference(sd, x):
    """The LAION / ImageReward MLP by explicit matmuls in float64 (no activations, eval mode)."""
    x = x.double()
    for idx in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{idx}.weight"].double().T + sd[f"layers.{idx}.bias"].double()
    return x.squeeze(-1)


def clip_image_features(clip, pixel_values):
    """Projected image features via CLIPModel.get_image_features (tensor in transformers 4,
    output object in 5)."""
    out = clip.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_text_features(clip, input_ids, attention_mask):
    out = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output
