"""The frozen LLM: a transformers decoder-only causal LM (OPT, Llama, Qwen, SmolLM, ...) or Flan-T5, fed the
projected queries as a soft visual prompt (BLIP-2 §3.3).

Decoder-only: [proj(Z) ; embed(BOS prompt text eos)], loss on the text after the prompt (LAVIS Blip2OPT).
Encoder-decoder: encoder [proj(Z) ; embed(text_input </s>)], decoder targets text_output (LAVIS Blip2T5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from blip2cli.config import GenerationOptions
from blip2cli.model import decode, int8_linear, opt_step, packed, screened_head
from blip2cli.model.screened_head import ScreenedHead


class FrozenLLM(nn.Module):
    """Wraps a transformers LM and its tokenizer; never trained, always in eval mode."""

    def __init__(self, model: nn.Module, tokenizer, eos_text: str = "\n", max_text_len: int = 32) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.eos_text = eos_text
        self.max_text_len = max_text_len
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        # inference-only models (load_model) may repack their linear layers for decoding several rows at a time
        # (model/packed.py); a model that trains never does: packed layers have no backward
        self.pack_for_decoding = False
        self.packed = False
        self.screen: ScreenedHead | bool | None = None  # _screened_head: built once (False: not for this model)
        if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without a pad token
            tokenizer.pad_token = tokenizer.eos_token
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenLLM:
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def eos_token_ids(self) -> list[int]:
        """Where generation stops: the model's own eos, plus `eos_text` (OPT's "\\n" = 50118) for decoder-only
        models, whose captions are trained to end with it (LAVIS Blip2OPT)."""
        configured = self.model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        if not self.is_encoder_decoder and self.eos_text:
            pieces = self.tokenizer(self.eos_text, add_special_tokens=False).input_ids
            if len(pieces) == 1:
                ids.append(pieces[0])
        return sorted({i for i in ids if i is not None})

    def _tokens(self, texts: Sequence[str], side: str, max_length: int | None = None) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=max_length is not None, max_length=max_length,
            return_tensors="pt", padding_side=side,
        )
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def decoder_inputs(self, prefix: Tensor, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """[pads ; prefix ; BOS text] for generation: left padding moved in front of the prefix, as transformers'
        BLIP-2 processor lays it out, so position ids (from the mask) and the KV cache see no gaps."""
        ids, mask = self._tokens(texts, "left")
        embeds = torch.cat((prefix.to(self.dtype), self._embed(ids)), dim=1)  # (B, Q+T, D)
        mask = torch.cat((mask.new_ones(prefix.shape[:2]), mask), dim=1)
        order = torch.argsort(mask, dim=1, stable=True)  # pads (0) first, the rest keeps its order
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        return embeds, mask.gather(1, order)

    def encoder_inputs(self, prefix: Tensor, texts: Sequence[str], truncate: bool = True) -> tuple[Tensor, Tensor]:
        """[prefix ; text </s> ; pads] for the T5 encoder (right padding). Training truncates to max_text_len;
        generation does not (LAVIS keeps a long question's "Short answer:")."""
        ids, mask = self._tokens(texts, "right", self.max_text_len if truncate else None)
        embeds = torch.cat((prefix.to(self.dtype), self._embed(ids)), dim=1)
        return embeds, torch.cat((mask.new_ones(prefix.shape[:2]), mask), dim=1)

    def prompt_logits(self, prefix: Tensor, prompts: Sequence[str]) -> Tensor:
        """Next-token logits over [prefix ; prompt] (decoder-only) or the first decoder step (T5): (B, S, V)."""
        if self.is_encoder_decoder:
            embeds, mask = self.encoder_inputs(prefix, prompts, truncate=False)
            start = torch.full((prefix.shape[0], 1), self.model.config.decoder_start_token_id, device=self.device)
            return self.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=start).logits
        embeds, mask = self.decoder_inputs(prefix, prompts)
        return self.model(inputs_embeds=embeds, attention_mask=mask).logits

    @torch.no_grad()
    def generate_tokens(self, prefix: Tensor, prompts: Sequence[str], options: GenerationOptions) -> Tensor:
        """New token ids (B * num_return_sequences, L); the prompt is not included."""
        if self.is_encoder_decoder:
            embeds, mask = self.encoder_inputs(prefix, prompts, truncate=False)
        else:
            embeds, mask = self.decoder_inputs(prefix, prompts)
        ours = decode.supported(self.model, options)  # our loop: same tokens, less work (see decode.py)
        head = self._screened_head() if ours and options.num_beams == 1 else None
        if head is None:  # a screened greedy decode multiplies by no fp32 weight that packing would speed up
            self._lay_out(prefix.shape[0] * max(options.num_beams, options.num_return_sequences))
        if ours:
            return decode.decode(self.model, embeds, mask, options, self.eos_token_ids(), self.tokenizer.pad_token_id,
                                 head)
        return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **self._generate_kwargs(options))

    def _lay_out(self, rows: int) -> None:
        """Pack the linear layers once, at the first decode of at least two rows; at one row, lay out only the LM
        head for it (model/packed.py)."""
        if not self.pack_for_decoding or self.packed or not packed.available(self.device):
            return
        if rows >= 2:
            packed.pack_linears(self.model)
            self.packed = True
        elif not self._screened_head():  # the screen reads candidate rows of the head: they stay contiguous
            packed.transpose_head(self.model)

    def _screened_head(self) -> ScreenedHead | None:
        """An int8 model's greedy argmax over its fp32 LM head, screened in int8 (model/screened_head.py): built at
        the first greedy decode of a model loaded to run whose LLM has CPU int8 layers (int8_linear.py) and takes
        opt_step's lean decoding step, which hands over the head's input."""
        if self.screen is None:
            int8 = self.pack_for_decoding and any(isinstance(m, int8_linear.Int8Linear) for m in self.model.modules())
            lean = int8 and opt_step.stepper(self.model) is not None
            self.screen = (lean and screened_head.for_lm(self.model)) or False
        return self.screen or None

    def generate(self, prefix: Tensor, prompts: Sequence[str], options: GenerationOptions) -> list[list[str]]:
        """Captions or answers: `options.num_return_sequences` texts per prefix row, prompt not included."""
        out = self.generate_tokens(prefix, prompts, options)
        texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        n = options.num_return_sequences
        return [texts[i * n:(i + 1) * n] for i in range(prefix.shape[0])]

    def _generate_kwargs(self, o: GenerationOptions) -> dict:
        """`generate`'s arguments, each only where it applies: transformers warns ("generation flags are not
        valid") about a beam-only flag without beams and a sampling-only flag without sampling."""
        kwargs = dict(
            max_new_tokens=o.max_new_tokens, min_new_tokens=o.min_new_tokens, do_sample=o.do_sample,
            repetition_penalty=o.repetition_penalty, num_return_sequences=o.num_return_sequences,
            eos_token_id=self.eos_token_ids(), pad_token_id=self.tokenizer.pad_token_id,
        )
        if o.do_sample:
            kwargs.update(top_p=o.top_p, temperature=o.temperature, num_beams=1)
        else:  # unset the sampling-only settings a generation_config may carry
            kwargs.update(top_p=None, temperature=None, top_k=None, num_beams=o.num_beams)
        if kwargs["num_beams"] > 1:
            kwargs["length_penalty"] = o.length_penalty
        return kwargs

    def decoder_loss_inputs(
        self, prefix: Tensor, texts: Sequence[str], prompt: str | Sequence[str]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Stage-2 training batch for decoder-only LLMs: embeds, mask, ids and prompt lengths (BOS counted).
        Each text is `prompt + caption` already; `eos_text` is appended here (LAVIS Blip2OPT)."""
        ids, mask = self._tokens([t + self.eos_text for t in texts], "right", self.max_text_len)
        prompts = [prompt] * len(texts) if isinstance(prompt, str) else list(prompt)
        lengths = [len(self.tokenizer(p).input_ids) if p else 0 for p in prompts]
        embeds = torch.cat((prefix.to(self.dtype), self._embed(ids)), dim=1)
        full_mask = torch.cat((mask.new_ones(prefix.shape[:2]), mask), dim=1)
        return embeds, full_mask, ids, torch.tensor(lengths, device=ids.device)

    def seq2seq_loss(self, prefix: Tensor, inputs: Sequence[str], outputs: Sequence[str]) -> Tensor:
        """Flan-T5 stage-2 / fine-tune loss: encoder [prefix ; input], decoder targets `outputs` (T5's CE)."""
        embeds, mask = self.encoder_inputs(prefix, inputs)
        out_ids, out_mask = self._tokens(outputs, "right", self.max_text_len)
        labels = out_ids.masked_fill(out_mask == 0, -100)
        return self.model(
            inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_attention_mask=out_mask
        ).loss
