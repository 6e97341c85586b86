"""Build a small, randomly initialised CLIP, SigLIP or SigLIP2 checkpoint on disk.

It loads through exactly the same `from_pretrained` path as a hub model, so the fast tests
exercise the real loading code. Its weights are random (seeded): vectors are deterministic
but carry no meaning. Tests that need meaning use the trained toy model instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from .toytrain import TrainConfig, build_model, build_processor, train_tokenizer

CORPUS = (
    "a photo of the red green blue yellow black white bicycle bike car house tree boat cat dog",
    "a picture of a small square, a drawing of a large star: one two three",
)


def build_tiny_model(
    out_dir: Path,
    *,
    kind: Literal["clip", "siglip", "siglip2"] = "clip",
    seed: int = 0,
    image_size: int = 32,
    width: int = 32,
    projection_dim: int = 16,
) -> Path:
    """Write config, weights, tokenizer and processor of a tiny model into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, context=77)
    if kind == "clip":
        cfg = TrainConfig(
            seed=seed,
            image_size=image_size,
            width=width,
            vision_layers=2,
            text_layers=2,
            heads=2,
            projection_dim=projection_dim,
            context=77,
        )
        model, processor = build_model(cfg, tokenizer), build_processor(cfg, tokenizer)
    elif kind in ("siglip", "siglip2"):
        model, processor = _siglip(kind, tokenizer, seed=seed, image_size=image_size, width=width)
    else:
        raise ValueError(f"kind {kind!r} is not one of 'clip', 'siglip', 'siglip2'")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _siglip(kind: str, tokenizer: Any, *, seed: int, image_size: int, width: int) -> tuple[Any, Any]:
    towers = {"hidden_size": width, "intermediate_size": width * 2, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {
        **towers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 64,  # SigLIP pads every text to 64 tokens
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "projection_size": width,  # SigLIP has no projection: its embedding size is the tower width
    }
    torch.manual_seed(seed)
    if kind == "siglip":
        from transformers import SiglipConfig, SiglipModel, SiglipProcessor
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        vision = {**towers, "image_size": image_size, "patch_size": image_size // 4}
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
        return model, SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    from transformers import Siglip2Config, Siglip2Model, Siglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    # Siglip2Processor passes patch_size=16 and max_num_patches=256 on every call, so the
    # tower must take 16-pixel patches and up to 256 of them, whatever the image size.
    vision = {**towers, "patch_size": 16, "num_patches": 256}
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    image_processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256)
    return model, Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
