"""Train the small CLIP that cliplens ships, from scratch, on the toy world.

Everything is seeded and the run is bounded by the number of samples seen, not by wall
time, so the same command gives the same model on a busy machine. The loss is CLIP's:
for a batch of N image-caption pairs, the N×N matrix of cosines times a learned
temperature, cross-entropy over each row (image→text) and each column (text→image),
averaged.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .toyworld import CAPTION_TEMPLATES, COLOURS, KINDS, NUMBER_WORDS, SYNONYMS, WORDS, render, scenes

log = logging.getLogger(__name__)

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
# CLIP's own split: letters, single digits, runs of other symbols, and English contractions.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    samples: int = 300_000  # the run's length: samples seen, not seconds
    batch: int = 128
    pool: int = 40_000  # distinct scenes rendered once and revisited with fresh captions
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    image_size: int = 64
    width: int = 128
    vision_layers: int = 4
    text_layers: int = 3
    heads: int = 4
    projection_dim: int = 128
    context: int = 32
    vocab_size: int = 1000


def caption_corpus(seed: int, count: int = 20_000) -> list[str]:
    """Every caption form the world and the probes use, for training the tokenizer."""
    stream = scenes(seed)
    corpus = [c for _ in range(count) for c in next(stream).captions]
    for colour in COLOURS:
        for kind in KINDS:
            for name in SYNONYMS[kind]:
                corpus += [t.format(c=colour, k=name, b="sky") for t in CAPTION_TEMPLATES]
                corpus += [f"a {name} that is not {colour}", f"a {name} without {colour}", f"no {colour} {name}"]
    corpus += [f"{n} {k}s" for n in NUMBER_WORDS.values() for k in KINDS] + [f'the word "{w}"' for w in WORDS]
    return corpus


def train_tokenizer(corpus: Sequence[str], vocab_size: int, context: int = 77) -> Any:
    """A CLIP-style byte-level BPE (lowercase, `</w>` word ends) as a transformers CLIPTokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=SPECIAL[1]))
    # The same normaliser and pre-tokeniser as transformers' CLIPTokenizer, so that the
    # saved tokenizer splits text exactly as the one trained here.
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Every byte at the end of a word is registered up front, as CLIP's vocabulary has
        # them: no text falls back to the unknown token, and their ids are fixed (the
        # trainer would otherwise number them in hash-map order, different on every run).
        special_tokens=[*SPECIAL, *(ch + "</w>" for ch in alphabet)],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    # The tokenizers BPE wants merges as pairs, although transformers annotates list[str].
    return CLIPTokenizer(vocab=dict(state["vocab"]), merges=merges, model_max_length=context)  # pyright: ignore[reportArgumentType]


def build_model(cfg: TrainConfig, tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel

    towers = {"hidden_size": cfg.width, "intermediate_size": 4 * cfg.width, "num_attention_heads": cfg.heads}
    text = {
        **towers,
        "num_hidden_layers": cfg.text_layers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": cfg.context,
        # Must be the tokenizer's end-of-text id: the value 2 selects an older pooling rule.
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**towers, "num_hidden_layers": cfg.vision_layers, "image_size": cfg.image_size, "patch_size": 8}
    torch.manual_seed(cfg.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def build_processor(cfg: TrainConfig, tokenizer: Any) -> Any:
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = cfg.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy with the true pairs on the diagonal."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2


def diagonal_accuracy(logits: torch.Tensor) -> float:
    """Share of rows (image→text) and columns (text→image) whose true pair wins, averaged."""
    target = torch.arange(logits.shape[0], device=logits.device)
    rows = (logits.argmax(dim=1) == target).double().mean()
    cols = (logits.argmax(dim=0) == target).double().mean()
    return float((rows + cols) / 2)


@dataclass
class StepLog:
    step: int
    samples: int
    loss: float
    diagonal_accuracy: float  # share of rows and columns whose true pair wins
    logit_scale: float
    seconds: float


def train(
    cfg: TrainConfig,
    out: Path | None = None,
    *,
    on_step: Callable[[StepLog], None] | None = None,
    log_every: int = 50,
) -> tuple[Any, Any, list[StepLog]]:
    """Train from scratch; returns (model, processor, log) and saves to `out` when given."""
    started = time.perf_counter()
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = train_tokenizer(caption_corpus(cfg.seed + 1), cfg.vocab_size, cfg.context)
    processor = build_processor(cfg, tokenizer)
    model = build_model(cfg, tokenizer)
    stream = scenes(cfg.seed, held_out=False)
    pool = [next(stream) for _ in range(cfg.pool)]
    pixels = torch.cat(
        [
            processor(images=[render(s) for s in pool[i : i + 512]], return_tensors="pt")["pixel_values"]
            for i in range(0, len(pool), 512)
        ]
    )  # (P, 3, H, W), exactly what the processor gives at inference time
    steps = math.ceil(cfg.samples / cfg.batch)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    history: list[StepLog] = []
    order: list[int] = []
    model.train()
    for step in range(steps):
        if len(order) < cfg.batch:
            fresh = list(range(len(pool)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch], order[cfg.batch :]
        captions = [rng.choice(pool[i].captions) for i in idx]
        text = tokenizer(captions, padding=True, truncation=True, max_length=cfg.context, return_tensors="pt")
        out_ = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels[idx])
        logits = out_.logits_per_image
        loss = clip_loss(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP caps the temperature at 100
        if step % log_every == 0 or step == steps - 1:
            entry = StepLog(
                step,
                (step + 1) * cfg.batch,
                float(loss.detach()),
                diagonal_accuracy(logits.detach()),
                float(model.logit_scale.detach().exp()),
                round(time.perf_counter() - started, 1),
            )
            history.append(entry)
            if on_step:
                on_step(entry)
    model.eval()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "training.json").write_text(
            json.dumps({"config": asdict(cfg), "log": [asdict(h) for h in history]}, indent=1)
        )
    return model, processor, history
