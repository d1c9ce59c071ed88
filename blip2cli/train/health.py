"""Training health: the stuck-run warning for stage 1 (ITC + ITM + ITG), the most reported stage-1 complaint.

A stage-1 run whose Q-Former ignores the image shows two flat lines: ITM at its prior, H(1/3) = 0.637 (always
"no match" for 1 positive and 2 hard negatives), and ITC at ln(contrastive batch), equal similarities. ITG
still falls, because a caption model learns the captions' words without looking. `StuckWatch` reads the logged
records and warns once when either line has stayed flat for `train.stuck_warning_steps` optimizer steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from blip2cli.model.losses import itc_chance_loss, itc_similarity, itm_prior_loss

if TYPE_CHECKING:
    from blip2cli.model.blip2 import Blip2

ITM_MARGIN = 0.02  # relative: an ITM loss above 0.98 x H(1/3) counts as the prior
ITC_MARGIN = 0.03  # relative: an ITC loss above 0.97 x ln(batch) counts as chance

CAUSES = (
    "the Q-Former's outputs are (nearly) the same for every image or every caption, so the losses cannot tell "
    "pairs apart. Likely causes: (1) a randomly initialised Q-Former much narrower than BERT-base at BERT's std "
    "0.02: its query outputs start 99.99% identical across images and its [CLS] features across captions "
    "(set model.qformer.init_std ~ 0.8/sqrt(hidden_size), or init_from a BERT); (2) a learning rate too low, or "
    "still in warm-up; (3) a frozen ViT that carries little about the image (random weights, a few pixels) "
    "while data.augment changes every view; (4) too few samples per contrastive batch (micro_batch_size x "
    "processes). ITM leaves its prior only once ITC is well below ln(batch): if ITC is falling, give it time. "
    "README: 'What a healthy stage-1 run looks like'."
)


class StuckWatch:
    """Feed it each logged training record; it returns a warning (once per run) when ITM has sat at its prior,
    or ITC at chance, for `steps` optimizer steps. `steps` 0 never warns."""

    def __init__(self, steps: int, contrastive_batch: int, first_step: int = 0) -> None:
        self.steps = steps
        self.limits = {"itm": itm_prior_loss() * (1 - ITM_MARGIN),
                       "itc": itc_chance_loss(contrastive_batch) * (1 - ITC_MARGIN)}
        self.chance = {"itm": itm_prior_loss(), "itc": itc_chance_loss(contrastive_batch)}
        self.batch = contrastive_batch
        self.previous = first_step  # the step the current window of the log began at
        self.since: dict[str, int | None] = {"itm": None, "itc": None}
        self.warned = False

    def __call__(self, record: dict[str, Any]) -> str | None:
        step, began = record["step"], self.previous
        self.previous = step
        if self.warned or not self.steps:
            return None
        for name, limit in self.limits.items():
            if name not in record:
                continue
            flat = record[name] >= limit
            self.since[name] = (began if self.since[name] is None else self.since[name]) if flat else None
        stuck = [n for n, s in self.since.items() if s is not None and step - s >= self.steps]
        if not stuck:
            return None
        self.warned = True
        return self._message(stuck, step, record.get("lr"), "itc" in record and "itc" not in stuck)

    def _message(self, stuck: list[str], step: int, lr: float | None, itc_learns: bool) -> str:
        what = {"itm": f"ITM at its prior ({self.chance['itm']:.3f} = always 'no match')",
                "itc": f"ITC at chance (ln {self.batch} = {self.chance['itc']:.3f})"}
        flat = " and ".join(what[n] for n in stuck)
        rate = f" (lr now {lr:.2e})" if lr is not None else ""
        late = ("ITC is learning, and ITM often follows it late (its hard negatives come from ITC); if it stays, "
                if itc_learns else "")
        return f"warning: step {step}: {flat} for {self.steps}+ steps{rate}: {late}{CAUSES}"


@torch.no_grad()
def alignment(model: Blip2, pixels: torch.Tensor, captions: Sequence[Sequence[str]], batch: int = 64) -> dict:
    """How well a stage-1 model pairs a set of images (M, 3, S, S) with their captions (a list per image).

    i2t_r1: share of images whose highest-ITC caption, among all M images' captions, is one of their own (chance
    1/M); t2i_r1: share of captions whose highest-ITC image is theirs; itm_acc: balanced ITM accuracy over each
    image's captions (positives) and, per image, its hardest negative: the highest-ITC caption of another image
    (chance 0.5). The model is left in eval mode."""
    model.eval()
    embeds = torch.cat([model.vision_embeds(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    images = torch.cat([model.image_features(embeds[i:i + batch]) for i in range(0, len(embeds), batch)])
    texts = [c for cs in captions for c in cs]
    owner = torch.tensor([i for i, cs in enumerate(captions) for _ in cs], device=images.device)  # (T,)
    vectors = torch.cat([model.text_features(texts[i:i + batch]) for i in range(0, len(texts), batch)])
    sim = itc_similarity(images, vectors)  # (M, T)
    rows = torch.arange(len(captions), device=sim.device)
    i2t = owner[sim.argmax(dim=1)].eq(rows).float().mean()
    t2i = sim.argmax(dim=0).eq(owner).float().mean()
    hardest = sim.masked_fill(owner[None, :] == rows[:, None], float("-inf")).argmax(dim=1)  # (M,)
    matched = []
    for i in range(0, len(texts), batch):
        logits = model.itm_logits(embeds[owner[i:i + batch]], texts[i:i + batch])
        matched.append(logits.argmax(dim=1).eq(1))
    rejected = model.itm_logits(embeds, [texts[j] for j in hardest.tolist()]).argmax(dim=1).eq(0)
    itm = (torch.cat(matched).float().mean() + rejected.float().mean()) / 2
    return {"i2t_r1": round(float(i2t), 4), "t2i_r1": round(float(t2i), 4), "itm_acc": round(float(itm), 4)}
