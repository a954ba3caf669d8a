"""CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 * max(cos(image embedding, text embedding), 0),
averaged over image-prompt pairs, with a CLIP model loaded through transformers (safetensors only, never remote code).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from isles.protocol.errors import IslesError

from .pretrained import load_error, resolve_source

CLIP_ALIASES = {"clip": "hf:openai/clip-vit-base-patch32", "clip-l": "hf:openai/clip-vit-large-patch14"}


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], model: str, device: str | None = None) -> float:
    """Mean CLIP score of images [N, C, H, W] in [-1, 1] against their prompts (one per image)."""
    from transformers import CLIPModel, CLIPProcessor

    if len(images) != len(prompts):
        raise IslesError(f"{len(images)} images but {len(prompts)} prompts")
    hint = "pass clip, clip-l, hf:<CLIP id> or a local folder"
    source = resolve_source(CLIP_ALIASES.get(model, model), None, "CLIP model", hint)
    try:
        kwargs = source.load_kwargs()
        clip = CLIPModel.from_pretrained(source.path, use_safetensors=True, **kwargs).eval().to(device or "cpu")
        processor = CLIPProcessor.from_pretrained(source.path, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors...: one line for the user
        raise load_error("CLIP model", model, source, exc, hint) from None
    pixels = images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    scores = []
    for start in range(0, len(pixels), 64):
        batch = [p.permute(1, 2, 0).numpy() for p in pixels[start : start + 64]]
        inputs = processor(
            text=prompts[start : start + 64], images=batch, return_tensors="pt", padding=True, truncation=True
        ).to(clip.device)
        out = clip(**inputs)
        cos = F.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)
        scores.append((100 * cos.clamp_min(0)).cpu())
    return float(torch.cat(scores).mean())
