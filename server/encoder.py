"""The CLIP-family encoder: two towers that map images and texts into one space.

Any Hugging Face image-text checkpoint with `get_image_features` and `get_text_features`
loads here through the Auto classes, by hub id or local folder: CLIP (softmax over a
learned logit scale) and SigLIP/SigLIP2 (sigmoid, with a learned logit bias).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from .preprocess import FastPreprocessor

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
# The small CLIP trained on the toy world (`cliplens train-toy`), shipped in the package.
TOY_MODEL_DIR = Path(__file__).parent / "toy_model"
MODEL_ALIASES = {"toy": TOY_MODEL_DIR}
# Bumped whenever our own image path changes the pixels that reach the model, so that
# vectors made by an older pipeline land in a different collection.
PREPROCESSING_VERSION = 2  # 2: our own resize/crop/normalise, and JPEG draft decoding
# Largest batches sent through a tower at once: they bound memory, not what callers may pass.
IMAGE_CHUNK = 64
TEXT_CHUNK = 256
TEXT_CACHE_SIZE = 4096  # query vectors kept, so a repeated query skips the text tower

ProbabilityKind = Literal["softmax", "sigmoid"]
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class ModelInfo:
    model_id: str  # hub id, or the resolved local folder
    model_type: str  # config.model_type: "clip", "siglip", "siglip2", ...
    dim: int  # embedding size of the shared space
    fingerprint: str  # changes when the weights or preprocessing change
    probability: ProbabilityKind


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless one is named."""
    if requested not in DEVICES:
        raise ValueError(f"device {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU; use --device auto or cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but this torch has no Apple MPS; use --device auto/cpu")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm).

    Without it, torch emulates bf16 on the CPU and is slower than fp32.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def pick_precision(requested: str, device: torch.device) -> str:
    """fp16 on CUDA, bf16 on CPUs that compute it natively, fp32 otherwise, unless one is named."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device.type == "cuda":
            return "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise ValueError("precision 'fp16' needs a GPU (cuda or mps); on the CPU use bf16, fp32 or int8")
    if requested == "int8" and device.type != "cpu":
        raise ValueError(f"precision 'int8' (dynamic quantisation) runs on the CPU only, not on {device.type}")
    return requested


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that a machine without network fails in seconds rather than
    after the hub client's retries with backoff (about 25 s)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in _OFFLINE_FLAGS)


def _load_failure(model: str, exc: BaseException | None, *, why: str = "") -> ModelLoadError:
    local = Path(model).expanduser()
    if local.is_dir():
        tried = f"tried the local folder {local}"
    elif _looks_like_path(model):
        tried = f"no folder {local} exists, and {model!r} is not a hub id (owner/name)"
    else:
        tried = f"tried the Hugging Face hub id {model!r} in the cache ({_hf_cache()})"
    cause = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    hints = [
        "Fix: pass --model with a hub id such as openai/clip-vit-base-patch32 or",
        "google/siglip-base-patch16-224,",
        "or a local folder saved by save_pretrained (config.json, weights, tokenizer, processor config).",
        "For an offline machine, run `hf download openai/clip-vit-base-patch32` where there is network,",
        "copy the HF_HOME cache (default ~/.cache/huggingface) across, and set HF_HUB_OFFLINE=1.",
    ]
    return ModelLoadError(f"could not load model {model!r}: {tried}{why}{cause}\n" + " ".join(hints))


def _hf_cache() -> str:
    return os.environ.get("HF_HUB_CACHE") or str(
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )


def _fingerprint(model: Any, source: str, image_processor: Any) -> str:
    h = hashlib.sha256()
    h.update(source.encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        h.update(commit.encode())
    else:
        # Local folders have no commit: sample the weights so that two random inits differ.
        first = next(iter(model.state_dict().values()))
        h.update(first.detach().float().cpu().numpy().tobytes()[:65536])
    h.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(PREPROCESSING_VERSION).encode())
    return h.hexdigest()[:16]


class ClipEncoder:
    """Holds one image-text model and its processor; every output is L2-normalised float32.

    `precision` is applied after the fingerprint is taken, so a model run in bf16 on one
    machine and fp32 or fp16 on another writes into the same collection.
    """

    def __init__(
        self, model: Any, processor: Any, model_id: str, device: torch.device, precision: str = "fp32"
    ) -> None:
        self.processor = processor
        self.device = device
        config = model.config
        self.model_type: str = config.model_type
        self.probability: ProbabilityKind = "sigmoid" if self.model_type.startswith("siglip") else "softmax"
        fingerprint = _fingerprint(model, model_id, processor.image_processor)
        self.precision = pick_precision(precision, device)
        self.model = _apply_precision(model, self.precision)
        # The model runs one batch at a time; tool calls and indexing jobs may arrive concurrently.
        self._lock = threading.Lock()
        self.dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        # None for processors with no fixed-size pixel tensor (SigLIP2): they go through the processor.
        self.fast = FastPreprocessor.for_processor(processor.image_processor)
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        probe = self.embed_texts(["a photo"])
        self.info = ModelInfo(
            model_id=model_id,
            model_type=self.model_type,
            dim=int(probe.shape[1]),
            fingerprint=fingerprint,
            probability=self.probability,
        )

    @property
    def logit_scale(self) -> float:
        """exp of the learned temperature parameter: the factor applied to cosines."""
        return float(self.model.logit_scale.detach().float().exp().item())

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().float().reshape(-1)[0].item())

    @property
    def batch_size(self) -> int:
        """Images per forward pass when indexing: large on a GPU, moderate on a CPU."""
        return 256 if self.device.type == "cuda" else 32

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """How small a JPEG may be drafted for this model (see FastPreprocessor.draft_size)."""
        return None if self.fast is None else self.fast.draft_size

    def _unit(self, out: Any) -> np.ndarray:
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = feats.float()
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return feats.cpu().numpy().astype(np.float32)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32 model input for one RGB image; thread-safe, takes no lock."""
        if self.fast is not None:
            return self.fast(image)
        return np.asarray(self.processor.image_processor(images=[image], return_tensors="np")["pixel_values"][0])

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) unit vectors for N RGB images."""
        if not images:
            return np.zeros((0, self.info.dim), np.float32)
        if self.fast is not None:
            return self.embed_pixels(np.stack([self.fast(img) for img in images]))
        chunks = [images[i : i + IMAGE_CHUNK] for i in range(0, len(images), IMAGE_CHUNK)]
        return np.concatenate([self._embed_with_processor(chunk) for chunk in chunks])

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, D) unit vectors for (N, 3, H, W) pixels made by `preprocess`."""
        if len(pixels) == 0:
            return np.zeros((0, self.info.dim), np.float32)
        chunks = [pixels[i : i + IMAGE_CHUNK] for i in range(0, len(pixels), IMAGE_CHUNK)]
        return np.concatenate([self._embed_pixel_chunk(chunk) for chunk in chunks])

    @torch.inference_mode()
    def _embed_pixel_chunk(self, pixels: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        if self.device.type == "cuda":
            # Pinned host memory lets the copy to the GPU run without an extra staging copy.
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = batch.to(self.device, self.dtype)
        with self._lock:
            out = self.model.get_image_features(pixel_values=batch)
        return self._unit(out)

    @torch.inference_mode()
    def _embed_with_processor(self, images: Sequence[Image.Image]) -> np.ndarray:
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self._lock:
            out = self.model.get_image_features(**inputs)
        return self._unit(out)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # SigLIP was trained on max-length padding; CLIP pools at the end-of-text token and
        # needs no padding beyond the batch (a single query is never padded to 77 tokens).
        padding = "max_length" if self.probability == "sigmoid" else True
        kwargs: dict[str, Any] = {"padding": padding, "truncation": True, "return_tensors": "pt"}
        if self.probability == "sigmoid":
            kwargs["max_length"] = 64
        return dict(self.processor(text=list(texts), **kwargs))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit vectors for N texts; repeated texts come from an LRU cache."""
        with self._cache_lock:
            cached = {t: self._text_cache[t] for t in texts if t in self._text_cache}
            for text in cached:
                self._text_cache.move_to_end(text)
        missing = list(dict.fromkeys(t for t in texts if t not in cached))
        if missing:
            chunks = [missing[i : i + TEXT_CHUNK] for i in range(0, len(missing), TEXT_CHUNK)]
            fresh = np.concatenate([self._embed_text_chunk(chunk) for chunk in chunks])
            with self._cache_lock:
                for text, vec in zip(missing, fresh, strict=True):
                    vec.flags.writeable = False  # shared by every later caller
                    cached[text] = vec
                    self._text_cache[text] = vec
                while len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
        return np.stack([cached[t] for t in texts])

    def clear_text_cache(self) -> None:
        with self._cache_lock:
            self._text_cache.clear()

    def embed_ensembles(self, groups: Sequence[Sequence[str]]) -> np.ndarray:
        """(G, D): each group's text vectors averaged, then re-normalised (a prompt ensemble)."""
        vecs = self.embed_texts([text for group in groups for text in group])
        ends = np.cumsum([len(group) for group in groups])
        means = np.stack([part.mean(axis=0) for part in np.split(vecs, ends[:-1])])
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)

    @torch.inference_mode()
    def _embed_text_chunk(self, texts: Sequence[str]) -> np.ndarray:
        inputs = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        with self._lock:
            out = self.model.get_text_features(**inputs)
        return self._unit(out)


def _apply_precision(model: Any, precision: str) -> Any:
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision == "fp16":
        return model.half()
    if precision == "int8":
        # Dynamic int8 on the Linear layers (the bulk of a ViT's compute); opt-in only,
        # because it costs retrieval accuracy (see `cliplens parity`).
        with warnings.catch_warnings():
            # torch marks its eager quantisation as deprecated; it still ships and works in 2.13.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


class _NotImageText(Exception):
    pass


def _from_pretrained(source: str, dtype: torch.dtype, local_only: bool) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoProcessor

    net = AutoModel.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    # Checked before the processor, whose absence would hide the real problem.
    if not (hasattr(net, "get_image_features") and hasattr(net, "get_text_features")):
        raise _NotImageText(type(net).__name__)
    processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    return net, processor


def _not_image_text(model: str, class_name: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {model!r} loaded as {class_name}, which is not an image-text model: it lacks "
        "get_image_features/get_text_features. Use a CLIP, SigLIP or SigLIP2 checkpoint, "
        "e.g. --model openai/clip-vit-base-patch32."
    )


def load_encoder(model: str = DEFAULT_MODEL, device: str = "auto", precision: str = "auto") -> ClipEncoder:
    """Load any CLIP-family checkpoint by hub id or local folder, failing fast and helpfully."""
    dev = pick_device(device)
    pick_precision(precision, dev)  # a bad value fails before seconds of loading
    alias = MODEL_ALIASES.get(model)
    local = alias or Path(model).expanduser()
    is_dir = local.is_dir()
    source = str(local.resolve()) if is_dir else model
    # Always fp32 here: the fingerprint samples the weights, and the precision is applied after.
    dtype = torch.float32
    if not is_dir and _looks_like_path(model):
        raise _load_failure(model, None)
    try:
        # The cache first: a cached hub model then loads without touching the network.
        net, processor = _from_pretrained(source, dtype, local_only=True)
    except _NotImageText as exc:
        raise _not_image_text(model, str(exc)) from None
    except Exception as cache_exc:  # transformers raises OSError, ValueError, KeyError... for bad ids
        if is_dir or _hub_offline():
            why = " (HF_HUB_OFFLINE is set, so only the cache was searched)" if _hub_offline() else ""
            raise _load_failure(model, cache_exc, why=why) from cache_exc
        if not _hub_reachable():
            why = " and it is not cached; the hub is unreachable"
            raise _load_failure(model, None, why=why) from cache_exc
        try:
            net, processor = _from_pretrained(source, dtype, local_only=False)
        except _NotImageText as exc:
            raise _not_image_text(model, str(exc)) from None
        except Exception as exc:
            raise _load_failure(model, exc) from exc
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        raise ModelLoadError(
            f"model {model!r} has no joint image+text processor ({type(processor).__name__}); "
            "its folder needs processor_config.json (or preprocessor_config.json) and a tokenizer."
        )
    net.eval().to(dev)
    encoder = ClipEncoder(net, processor, model if alias else source, dev, precision)
    log.info("loaded %s (%s) on %s in %s", source, net.config.model_type, dev, encoder.precision)
    return encoder
