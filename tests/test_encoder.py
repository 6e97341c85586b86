"""Model loading (local folder, hub cache, offline flags, failures) and preprocessing parity."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor, GPT2Config, GPT2Model

from cliplens.server.encoder import ModelLoadError, load_encoder, pick_device
from cliplens.server.images import load_image

from .conftest import make_image


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "palette.png", "gray.png"])
def test_our_pixels_match_the_models_own_processor(tiny_clip: Path, tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    pixels = (rng.random((70, 90, 3)) * 255).astype("uint8")
    img = Image.fromarray(pixels)
    if name == "palette.png":
        img = img.convert("P")
    elif name == "gray.png":
        img = img.convert("L")
    path = tmp_path / name
    img.save(path)
    encoder = load_encoder(str(tiny_clip), "cpu")
    ours = encoder.embed_images([load_image(path).image])[0]

    model = AutoModel.from_pretrained(tiny_clip).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        ref = model.get_image_features(**processor(images=Image.open(path), return_tensors="pt")).pooler_output
    cosine = float(F.cosine_similarity(torch.from_numpy(ours)[None], ref).item())
    assert cosine >= 0.999


def test_exif_rotation_is_applied_before_the_model(tiny_clip: Path, tmp_path: Path) -> None:
    upright = Image.new("RGB", (40, 80), (200, 30, 30))
    upright.paste((20, 20, 200), (0, 0, 40, 20))
    upright.save(tmp_path / "upright.jpg", quality=95)
    # Stored rotated, with orientation 6 saying "rotate 90° clockwise to display".
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    encoder = load_encoder(str(tiny_clip), "cpu")
    pictures = [load_image(tmp_path / name).image for name in ("upright.jpg", "rotated.jpg")]
    a, b = encoder.embed_images(pictures)
    assert float(a @ b) > 0.99


def test_a_cached_hub_model_loads_offline_by_id(tiny_clip: Path, tmp_path: Path) -> None:
    """The HF_HOME cache layout (models--org--name/snapshots/REV) loads with HF_HUB_OFFLINE=1."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-clip"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_clip, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    code = "from cliplens.server.encoder import load_encoder; print(load_encoder('acme/tiny-clip', 'cpu').info.dim)"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "16"


@pytest.mark.parametrize("offline", ["1", ""])
def test_an_uncached_hub_id_fails_fast_and_says_how_to_fix_it(tmp_path: Path, offline: str) -> None:
    code = "from cliplens.server.encoder import load_encoder; load_encoder('openai/clip-vit-base-patch32', 'cpu')"
    # Point the hub at a closed local port, so this never leaves the machine.
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": offline,
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "ModelLoadError" in done.stderr and "openai/clip-vit-base-patch32" in done.stderr
    assert "HF_HUB_OFFLINE" in done.stderr and "hf download" in done.stderr
    assert ("only the cache was searched" if offline else "unreachable") in done.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s: loading must fail fast"


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no folder .*nope exists"):
        load_encoder(str(tmp_path / "nope"), "cpu")


def test_a_model_that_is_not_image_text_is_refused(tmp_path: Path) -> None:
    GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="GPT2Model, which is not an image-text model"):
        load_encoder(str(tmp_path), "cpu")


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    make_image(tmp_path / "x.png")
    with pytest.raises(ModelLoadError, match="tried the local folder"):
        load_encoder(str(tmp_path), "cpu")


def test_device_choice() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="'tpu' is not one of auto, cpu, cuda, mps"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def test_siglip_loads_with_bias_and_sigmoid(tiny_siglip: Path) -> None:
    encoder = load_encoder(str(tiny_siglip), "cpu")
    assert encoder.probability == "sigmoid" and encoder.logit_bias is not None
    assert encoder.info.model_type == "siglip" and encoder.info.dim == 32


def test_siglip2_loads_and_embeds_any_aspect_ratio(tmp_path: Path) -> None:
    from cliplens.server.tinymodel import build_tiny_model

    encoder = load_encoder(str(build_tiny_model(tmp_path / "s2", kind="siglip2")), "cpu")
    assert encoder.info.model_type == "siglip2" and encoder.probability == "sigmoid"
    vecs = encoder.embed_images([Image.new("RGB", (50, 70), "red"), Image.new("RGB", (300, 40), "blue")])
    assert vecs.shape == (2, 32) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert encoder.embed_texts(["a red bicycle"]).shape == (1, 32)


def test_two_models_with_one_size_get_different_fingerprints(tiny_clip: Path, tmp_path: Path) -> None:
    from cliplens.server.tinymodel import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    a, b = load_encoder(str(tiny_clip), "cpu").info, load_encoder(str(other), "cpu").info
    assert a.dim == b.dim and a.fingerprint != b.fingerprint


def test_large_inputs_are_embedded_in_chunks_with_the_same_result(tiny_clip: Path) -> None:
    from cliplens.server.encoder import TEXT_CHUNK

    encoder = load_encoder(str(tiny_clip), "cpu")
    texts = [f"a photo of {i} red cars" for i in range(TEXT_CHUNK + 5)]
    together = encoder.embed_texts(texts)
    assert together.shape == (TEXT_CHUNK + 5, 16)
    for i in (0, TEXT_CHUNK - 1, TEXT_CHUNK, TEXT_CHUNK + 4):
        assert np.allclose(together[i], encoder.embed_texts([texts[i]])[0], atol=1e-5)
