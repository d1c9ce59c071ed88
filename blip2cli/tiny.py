"""Tiny random BLIP-2 checkpoints built offline, saved with transformers' `save_pretrained`, so tests and
benchmarks load them through the same code path as a hub download. Tokenizers are trained on the fly with
`tokenizers`. Nothing in the package imports this module."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "a photo of a man and a chicken", "a dog running on the beach", "two cats on a pink blanket",
    "a red bicycle leaning against a wall", "question: what is unusual? short answer: the chicken",
    "a plate of food with broccoli", "a train on the tracks", "people riding horses in a field",
    "a kitchen with a stove and a sink", "the sky is blue and the grass is green", "an airplane in the sky",
] * 4

Q = 4  # queries
WIDTH = 32  # the ViT's and the LLM's hidden size (`width=`: 64 gives in_features bitsandbytes' CPU NF4 can take)
VISION = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)


def bert_tokenizer(out: Path):
    """WordPiece BERT tokenizer with [DEC] as bos_token (ids: [PAD]=0 ... like BERT's specials)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(CORPUS, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.add_special_tokens({"bos_token": "[DEC]"})
    fast.save_pretrained(out)
    return fast


def opt_tokenizer(out: Path):
    """Byte-level BPE like OPT's: </s> (id 2) prepended as BOS, <pad> = 1, "\\n" a single token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + ["\n"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                       special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def t5_tokenizer(out: Path):
    """Unigram-free WordLevel tokenizer with T5's specials: <pad> = 0, </s> = 1 appended, <unk> = 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers' init makes the vision weights ~1e-10: give every weight a visible random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name.lower():
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            if name.endswith("self_attn.qkv.bias"):  # official files: the key third is zero (HF's conversion script)
                p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0


def _qformer_config(vocab_size: int, text: bool, vision_width: int = WIDTH):
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, cross_attention_frequency=2, encoder_hidden_size=vision_width,
                              max_position_embeddings=64, use_qformer_text_input=text)


def _processor(tokenizer, out: Path, num_query_tokens: int | None):
    from transformers import Blip2Processor, BlipImageProcessor

    from blip2cli.config import CLIP_MEAN, CLIP_STD

    images = BlipImageProcessor(size={"height": 28, "width": 28}, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD), do_convert_rgb=True)
    processor = Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    processor.save_pretrained(out)
    return processor


def _vision_config(width: int):
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig(**{**VISION, "hidden_size": width, "intermediate_size": 2 * width})


def _save_generation_model(out: Path, tok, text_config, seed: int, width: int) -> Path:
    """A random Blip2ForConditionalGeneration around `text_config`, saved with `save_pretrained` into `out`."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(vision_config=_vision_config(width).to_dict(), text_config=text_config.to_dict(),
                         qformer_config=_qformer_config(30522, False, width).to_dict(), num_query_tokens=Q,
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(config)
    _randomize(model, seed)
    model.save_pretrained(out)
    return out


def opt_model(out: Path, seed: int = 0, width: int = WIDTH) -> Path:
    """A Blip2ForConditionalGeneration with a tiny OPT, saved like the Salesforce/blip2-opt-* repos. `width`: the
    ViT's and OPT's hidden size (their feed-forward layers are twice as wide)."""
    from transformers import OPTConfig

    tok = opt_tokenizer(out)
    processor = _processor(tok, out, Q)  # adds <image>
    tok = processor.tokenizer
    newline = tok("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1
    text = OPTConfig(vocab_size=len(tok), hidden_size=width, num_hidden_layers=2, ffn_dim=2 * width,
                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=width, pad_token_id=1,
                     bos_token_id=2, eos_token_id=newline[0])  # as in the hub config: eos = "\n" (LAVIS Blip2OPT)
    return _save_generation_model(out, tok, text, seed, width)


def t5_model(out: Path, seed: int = 1, width: int = WIDTH) -> Path:
    """Likewise with a tiny Flan-T5 (gated-GELU feed-forward, untied LM head). `width`: as in `opt_model`."""
    from transformers import T5Config

    tok = t5_tokenizer(out)
    processor = _processor(tok, out, Q)
    tok = processor.tokenizer
    text = T5Config(vocab_size=len(tok), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2,
                    num_decoder_layers=2, num_heads=4, dense_act_fn="gelu", is_gated_act=True,
                    feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                    bos_token_id=1, tie_word_embeddings=False)
    return _save_generation_model(out, tok, text, seed, width)


def retrieval_model(out: Path, seed: int = 2) -> Path:
    """A Blip2ForImageTextRetrieval like Salesforce/blip2-itm-vit-g (BERT tokenizer + [DEC], no processor config)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    tok = bert_tokenizer(out)
    config = Blip2Config(vision_config=_vision_config(WIDTH).to_dict(),
                         qformer_config=_qformer_config(len(tok), True).to_dict(), num_query_tokens=Q,
                         image_text_hidden_size=16)
    model = Blip2ForImageTextRetrieval(config)
    _randomize(model, seed)
    model.save_pretrained(out)
    return out


def pixels(n: int = 2, seed: int = 0, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
