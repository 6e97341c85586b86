"""Every number of explain_similarity_matrix against an independent computation: the model's
own forward pass (logits and training loss) and torch.nn.functional on raw features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

from cliplens.server.config import Settings

from .conftest import connect, make_image, structured

CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]


def _images(folder: Path) -> list[Path]:
    return [make_image(folder / f"{c}.png", c) for c in ("red", "green", "blue", "yellow")]


def _reference(model_dir: Path, paths: list[Path], captions: list[str], sigmoid: bool) -> dict[str, torch.Tensor]:
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    pictures = [Image.open(p).convert("RGB") for p in paths]
    text_kwargs = {"padding": "max_length", "max_length": 64} if sigmoid else {"padding": True}
    inputs = processor(text=captions, images=pictures, return_tensors="pt", truncation=True, **text_kwargs)
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
        img = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1)
        txt_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        txt = F.normalize(model.get_text_features(**txt_inputs).pooler_output, dim=-1)
    return {
        "out_logits": out.logits_per_image,
        "out_loss": out.loss,
        "cos": img @ txt.T,
        "scale": model.logit_scale.detach().exp(),
        "bias": getattr(model, "logit_bias", torch.zeros(1)).detach(),
    }


async def test_clip_matrix_equals_the_models_own_forward_and_functional(
    settings: Settings, tiny_clip: Path, tmp_path: Path
) -> None:
    paths = _images(settings.allow[0] / "pairs")
    async with connect(settings) as client:
        out = structured(
            await client.call_tool(
                "explain_similarity_matrix", {"images": [str(p) for p in paths], "captions": CAPTIONS}
            )
        )
    ref = _reference(tiny_clip, paths, CAPTIONS, sigmoid=False)
    cos = torch.tensor(out["cosine"], dtype=torch.float64)
    logits = torch.tensor(out["logits"], dtype=torch.float64)
    assert cos.numpy() == pytest.approx(ref["cos"].double().numpy(), abs=1e-4)
    assert out["logit_scale"] == pytest.approx(float(ref["scale"]), rel=1e-6)
    # CLIP's own logits_per_image and its own training loss (clip_loss).
    assert logits.numpy() == pytest.approx(ref["out_logits"].double().numpy(), abs=2e-3)
    assert out["loss"] == pytest.approx(float(ref["out_loss"]), abs=1e-3)
    target = torch.arange(4)
    assert out["loss_image_to_text"] == pytest.approx(float(F.cross_entropy(logits, target)), abs=1e-5)
    assert out["loss_text_to_image"] == pytest.approx(float(F.cross_entropy(logits.T, target)), abs=1e-5)
    assert out["loss"] == pytest.approx((out["loss_image_to_text"] + out["loss_text_to_image"]) / 2, abs=1e-6)
    i2t = torch.tensor(out["image_to_text"], dtype=torch.float64)
    t2i = torch.tensor(out["text_to_image"], dtype=torch.float64)
    assert i2t.numpy() == pytest.approx(F.softmax(logits, dim=1).numpy(), abs=1e-5)
    assert t2i.numpy() == pytest.approx(F.softmax(logits, dim=0).numpy(), abs=1e-5)
    assert i2t.sum(dim=1).numpy() == pytest.approx([1.0] * 4, abs=1e-5)
    assert t2i.sum(dim=0).numpy() == pytest.approx([1.0] * 4, abs=1e-5)
    for i in range(4):
        wins = bool(cos[i].argmax() == i and cos[:, i].argmax() == i)
        assert out["diagonal_wins"][i] is wins
        reading = out["readings"][i]
        assert reading["best_caption_index"] == int(cos[i].argmax())
        top2 = torch.topk(cos[i], 2).values
        assert reading["margin"] == pytest.approx(float(top2[0] - top2[1]), abs=1e-5)
    assert out["probability"] == "softmax" and out["logit_bias"] is None


async def _call_siglip(model: Path, tmp_path: Path, tool: str, args: dict) -> dict:
    settings = Settings(
        model=str(model), device="cpu", precision="fp32", db_dir=tmp_path / "db", allow=[tmp_path / "allowed"]
    )
    async with connect(settings) as client:
        return structured(await client.call_tool(tool, args))


async def test_siglip_matrix_uses_the_sigmoid_loss_with_bias(tiny_siglip: Path, tmp_path: Path) -> None:
    paths = _images(tmp_path / "allowed")
    args = {"images": [str(p) for p in paths], "captions": CAPTIONS}
    out = await _call_siglip(tiny_siglip, tmp_path, "explain_similarity_matrix", args)
    ref = _reference(tiny_siglip, paths, CAPTIONS, sigmoid=True)
    assert out["probability"] == "sigmoid"
    assert out["logit_bias"] == pytest.approx(float(ref["bias"].reshape(-1)[0]), abs=1e-6)
    logits = torch.tensor(out["logits"], dtype=torch.float64)
    assert logits.numpy() == pytest.approx(ref["out_logits"].double().numpy(), abs=2e-3)
    # SigLIP's own training loss from its forward pass, and the formula written out.
    assert out["loss"] == pytest.approx(float(ref["out_loss"]), abs=1e-3)
    signs = 2 * torch.eye(4, dtype=torch.float64) - 1
    assert out["loss"] == pytest.approx(float(-F.logsigmoid(signs * logits).sum() / 4), abs=1e-5)
    expected = (ref["cos"].double() * ref["scale"].double() + ref["bias"].double()).numpy()
    assert logits.numpy() == pytest.approx(expected, abs=2e-3)


async def test_zero_shot_with_siglip_gives_independent_sigmoids(tiny_siglip: Path, tmp_path: Path) -> None:
    paths = _images(tmp_path / "allowed")
    args = {"images": [str(paths[0])], "labels": ["red", "green", "blue"], "templates": ["a {} square"]}
    out = await _call_siglip(tiny_siglip, tmp_path, "zero_shot_classify", args)
    res = out["results"][0]
    scale, bias = out["logit_scale"], out["logit_bias"]
    for label in ("red", "green", "blue"):
        z = torch.tensor(res["cosines"][label] * scale + bias, dtype=torch.float64)
        assert res["probabilities"][label] == pytest.approx(float(torch.sigmoid(z)), abs=1e-5)
    assert out["probability"] == "sigmoid"
