"""A config.json with absurd sizes is refused in one line before anything is allocated (issue 10)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.config import ModelConfig
from blip2cli.model.sizes import parameter_count

runner = CliRunner()

CASES = [  # (section, key, value, what the line says)
    ("vision_config", "num_hidden_layers", 100_000, "vision_config.num_hidden_layers: expected an integer from 1"),
    ("vision_config", "image_size", 10**7, "vision_config.image_size: expected an integer from 1"),
    ("vision_config", "hidden_size", -32, "vision_config.hidden_size: expected an integer from 1"),
    ("vision_config", "num_attention_heads", 0, "vision_config.num_attention_heads: expected an integer from 1"),
    ("vision_config", "num_attention_heads", 5, "not divisible by heads=5"),
    ("vision_config", "hidden_size", "big", "hidden_size"),
    ("vision_config", "patch_size", 0, "vision_config.patch_size: expected an integer from 1"),
    ("qformer_config", "max_position_embeddings", 10**9, "qformer_config.max_position_embeddings: expected"),
    ("qformer_config", "num_attention_heads", -1, "qformer_config.num_attention_heads: expected an integer from 1"),
    ("qformer_config", "num_hidden_layers", 0, "qformer_config.num_hidden_layers: expected an integer from 1"),
    ("", "num_query_tokens", 10**8, "config.num_query_tokens: expected an integer from 1"),
    ("", "num_query_tokens", 0, "config.num_query_tokens: expected an integer from 1"),
    ("text_config", "num_hidden_layers", -1, "text_config.num_hidden_layers: expected an integer from 1"),
    ("text_config", "vocab_size", 10**12, "text_config.vocab_size: expected an integer from 1"),
    # within every bound, but terabytes of parameters: the memory estimate refuses them
    ("vision_config", {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 500,
                       "num_attention_heads": 16}, None, "more than this machine's"),
    ("text_config", {"hidden_size": 65536, "ffn_dim": 262144, "num_hidden_layers": 1000,
                     "num_attention_heads": 64, "word_embed_proj_dim": 65536}, None, "more than this machine's"),
]


@pytest.mark.parametrize("section,key,value,message", CASES, ids=lambda x: str(x)[:40])
def test_absurd_config_is_one_line_exit_2(tmp_path: Path, tiny_opt_dir: Path, section, key, value, message) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_opt_dir, model)
    config = json.loads((model / "config.json").read_text())
    target = config[section] if section else config
    target.update(key if isinstance(key, dict) else {key: value})
    (model / "config.json").write_text(json.dumps(config))
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    result = runner.invoke(app, ["caption", str(image), "--model", str(model), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert message in lines[0] and "config.json" in lines[0]


def test_the_estimate_is_close_for_the_real_vit_g_and_q_former() -> None:
    """ViT-g (39 blocks) ~ 985 M and the BERT-base Q-Former with its text half ~ 188 M (BLIP-2 paper: 1.0 B, 188 M)."""
    count = parameter_count(ModelConfig())
    assert 1.1e9 < count < 1.25e9
