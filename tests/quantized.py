"""Checks the quantization tests share (tests/test_quantize.py: torchao; tests/test_quantize_bitsandbytes.py)."""

from __future__ import annotations

import torch

from tests import tiny


def teacher_forced_logits(model, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
    prefix = model.llm_prefix(model.vision_embeds(pixels))
    embeds, mask, _, _ = model.llm.decoder_loss_inputs(prefix, texts, "")
    return model.llm.model(inputs_embeds=embeds, attention_mask=mask).logits  # (B, Q + T, V)


def assert_stage2_trains_exactly_the_trainable_parts(model) -> None:
    """One stage-2 step through the model's quantized frozen LLM: gradients reach every trainable part (the
    Q-Former side, all fp32 plain tensors) and nothing of the frozen towers."""
    model.train()
    loss = model.stage2_loss(tiny.pixels(2), ["a dog running on the beach", "a train on the tracks"]).loss
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith(("vision.tower.", "llm.model.")) for n in trainable)
    assert {n.split(".")[0] for n in trainable} >= {"qformer", "query_tokens", "llm_proj", "ln_vision"}
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name  # through the quantized LLM to the Q-Former
            assert p.dtype == torch.float32 and not hasattr(p, "__tensor_flatten__"), name
        else:
            assert p.grad is None, name
