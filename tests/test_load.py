"""Loading every checkpoint kind, the weight-name tables, export to HF, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from blip2cli.errors import UsageError
from blip2cli.model import names as N
from blip2cli.model.export import export_hf
from blip2cli.model.load import load_model
from blip2cli.model.weights import read_safetensors
from tests import tiny


def _features(model, texts=("a man and a chicken", "a dog")):
    with torch.no_grad():
        e = model.vision_embeds(tiny.pixels(2, seed=11))
        return model.image_features(e), model.text_features(list(texts)), model.itm_logits(e, list(texts))


def test_name_tables_round_trip(tiny_retrieval_model_dir):
    """HF <-> ours; LAVIS names are checked against LAVIS's real key list in test_lavis_files.py."""
    model = load_model(str(tiny_retrieval_model_dir), "cpu", "float32")
    names = list(model.state_dict())
    for name in names:
        if name == "qformer.cls.predictions.decoder.weight" or name.endswith("k_bias"):
            continue  # tied copy; the zero key bias (LAVIS has none, HF fuses it)
        hf = N.ours_to_hf(name)
        if name == "temp" or name.startswith("qformer.cls."):
            assert hf is None  # HF has no place for them: the sidecar keeps them
        elif not name.endswith(("q_bias", "v_bias")):
            assert N.hf_to_ours(hf) == name, name
    hf_names = set(read_safetensors(tiny_retrieval_model_dir / "model.safetensors"))
    mapped = {N.hf_to_ours(n) for n in hf_names if not n.endswith("position_ids")}
    assert None not in mapped  # every HF weight has a home


def test_qkv_bias_split_and_fuse_round_trip():
    fused = {"vision.tower.blocks.0.attn.qkv.bias": torch.arange(12.0)}
    split = N.split_qkv_biases(fused)
    assert torch.equal(split["vision.tower.blocks.0.attn.k_bias"], torch.arange(4.0, 8.0))
    assert torch.equal(N.fuse_qkv_biases(split)["vision.tower.blocks.0.attn.qkv.bias"], torch.arange(12.0))


def test_pickle_that_is_not_weights_only_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1)}, "thing": _Thing()}, path)
    with pytest.raises(UsageError, match="refused to load"):
        load_model(str(path), "cpu", "float32")


class _Thing:
    pass


def test_export_loads_in_transformers_with_same_logits(tmp_path, tiny_opt_dir):
    from transformers import Blip2ForConditionalGeneration

    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    out = export_hf(model, tmp_path / "export")
    hf = Blip2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    again = load_model(str(out), "cpu", "float32")
    px = tiny.pixels(2, seed=5)
    ids = torch.tensor([[hf.config.image_token_index] * tiny.Q + model.llm.tokenizer("a photo of").input_ids] * 2)
    with torch.no_grad():
        expected = hf(pixel_values=px, input_ids=ids).logits
        got = again.llm.prompt_logits(again.llm_prefix(again.vision_embeds(px)), ["a photo of"] * 2)
    assert (got - expected).abs().max().item() <= 1e-4


def test_export_retrieval_keeps_temp_and_itg_head(tmp_path, tiny_retrieval_model_dir):
    from transformers import Blip2ForImageTextRetrieval

    model = load_model(str(tiny_retrieval_model_dir), "cpu", "float32")
    with torch.no_grad():
        model.temp.fill_(0.03)
        model.qformer.cls.predictions.bias.normal_()
    out = export_hf(model, tmp_path / "export")
    Blip2ForImageTextRetrieval.from_pretrained(out)  # transformers reads it
    again = load_model(str(out), "cpu", "float32")
    assert again.temp.item() == pytest.approx(0.03)
    assert torch.equal(again.qformer.cls.predictions.bias, model.qformer.cls.predictions.bias)
    for a, b in zip(_features(model), _features(again)):
        assert torch.allclose(a, b, atol=1e-6)


def test_weights_are_memory_mapped_not_copied(tiny_opt_dir):
    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    w = model.llm.model.get_input_embeddings().weight
    assert not w.untyped_storage().resizable()  # a view of the file mapping, not an owned copy


@pytest.mark.parametrize("name,message", [
    ("Salesforce/blip2-opt-99b", "Official BLIP-2 models"),
    ("./no/such/dir", "no such model"),
])
def test_bad_model_names_are_one_line(name, message):
    with pytest.raises(UsageError, match=message):
        load_model(name, "cpu", "float32")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="not a BLIP-2 checkpoint"):
        load_model(str(tmp_path), "cpu", "float32")


def test_missing_and_unexpected_weights_are_named(tmp_path, tiny_opt_dir):
    import shutil

    from safetensors.torch import save_file

    for case in ("missing", "unexpected"):
        d = tmp_path / case
        shutil.copytree(tiny_opt_dir, d)
        state = {k: v.clone() for k, v in read_safetensors(d / "model.safetensors").items()}
        if case == "missing":
            del state["qformer.encoder.layer.0.attention.attention.query.weight"]
        else:
            state["qformer.encoder.layer.0.extra.weight"] = torch.zeros(2)
        save_file(state, str(d / "model.safetensors"))
        with pytest.raises(UsageError, match=f"{case} weights: qformer.encoder.layer.0"):
            load_model(str(d), "cpu", "float32")


def test_position_embeddings_interpolate_for_larger_images():
    from blip2cli.model.vision import interpolate_pos_embed

    table = torch.randn(1, 1 + 16 * 16, 8)
    out = interpolate_pos_embed(table, 1 + 26 * 26)  # 224 -> 364 px with 14-px patches
    assert out.shape == (1, 677, 8) and torch.equal(out[:, 0], table[:, 0])  # CLS kept
    grid = table[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(26, 26), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 676, 8))
