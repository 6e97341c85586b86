"""Build a small, randomly initialised CLIP or SigLIP checkpoint on disk.

It loads through exactly the same `from_pretrained` path as a hub model, so tests and the
offline demo exercise the real loading code. Its weights are random (seeded): vectors are
deterministic but carry no meaning.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

DEFAULT_WORDS = (
    *("a", "photo", "of", "the", "picture", "drawing", "small", "large", "one", "two", "three"),
    *("red", "green", "blue", "yellow", "black", "white"),
    *("bicycle", "bike", "car", "house", "tree", "boat", "cat", "dog"),
)


def _byte_level_bpe(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary: byte alphabet, word-final variants, and merges that spell `words`."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


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
    from transformers import CLIPProcessor, CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_level_bpe(DEFAULT_WORDS)
    # The tokenizers BPE wants merges as pairs, although transformers annotates list[str].
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # pyright: ignore[reportArgumentType]
    towers = {
        "hidden_size": width,
        "intermediate_size": width * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    text = {
        **towers,
        "vocab_size": len(vocab),
        "max_position_embeddings": 77 if kind == "clip" else 64,  # SigLIP pads to 64
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**towers, "image_size": image_size, "patch_size": image_size // 4}
    torch.manual_seed(seed)
    if kind == "clip":
        from transformers import CLIPConfig, CLIPModel
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    elif kind == "siglip":
        from transformers import SiglipConfig, SiglipModel, SiglipProcessor
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        # SigLIP has no projection: its embedding size is the tower width.
        text["projection_size"] = width
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
        processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    elif kind == "siglip2":
        from transformers import Siglip2Config, Siglip2Model, Siglip2Processor
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

        # Siglip2Processor passes patch_size=16 and max_num_patches=256 on every call, so the
        # tower must take 16-pixel patches and up to 256 of them, whatever the image size.
        text["projection_size"] = width
        vision = {**towers, "patch_size": 16, "num_patches": 256}
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
        image_processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256)
        processor = Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    else:
        raise ValueError(f"kind {kind!r} is not one of 'clip', 'siglip', 'siglip2'")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
