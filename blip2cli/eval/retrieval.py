"""Image-text retrieval as BLIP-2 evaluates it (LAVIS `compute_sim_matrix`, `_report_metrics`).

1. ITC: S[i, t] = max over the 32 queries of <f_i[q], g_t>, no temperature.
2. Image -> text: the top k texts of each image by S get ITM + S (ITM = mean-over-queries positive logit),
   every other cell -100; text -> image the same with the top k images of each text.
3. The rank of an image is the best rank among its captions, that of a caption the rank of its image;
   R@K = 100 x the fraction with rank < K. Ties are broken by index, lowest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from blip2cli.data.transforms import clean_caption
from blip2cli.eval import check_inputs, check_weights, load_model, resume_log, write_outputs
from blip2cli.eval import datasets as ds
from blip2cli.jsonl import JsonlLog, read_jsonl
from blip2cli.model.losses import itc_similarity
from blip2cli.render import progress

if TYPE_CHECKING:
    from blip2cli.model.blip2 import Blip2

# (image indices (P,), text indices (P,)) -> ITM positive logit of each aligned pair (P,)
ItmFn = Callable[[Tensor, Tensor], Tensor]
FILL = -100.0  # LAVIS's score outside the top k; never ranks above a re-ranked cell


def itc_matrix(image_feats: Tensor, text_feats: Tensor, chunk: int = 256) -> Tensor:
    """(I, Q, D) image queries x (T, D) texts -> (I, T) max-over-queries cosine (`itc_similarity`), in chunks of
    images so the (C, T, Q) intermediate stays small."""
    rows = [itc_similarity(image_feats[i : i + chunk].float(), text_feats.float())
            for i in range(0, len(image_feats), chunk)]  # fmt: skip
    return torch.cat(rows)


def rerank_scores(
    itc: Tensor, itm_fn: ItmFn, k: int, show_progress: bool = False, log: Path | None = None
) -> tuple[Tensor, Tensor]:
    """The two-stage scores: i2t (I, T) and t2i (T, I), ITM + ITC on each row's top k by ITC, -100 elsewhere.
    With `log`, every re-ranked row is appended there and rows already in it are not computed again (resume)."""
    rows = RowLog(log) if log is not None else None
    i2t = _rerank_rows(itc, lambda row, cols: itm_fn(torch.full_like(cols, row), cols), k, show_progress,
                       "image→text", rows)
    t2i = _rerank_rows(itc.T, lambda row, cols: itm_fn(cols, torch.full_like(cols, row)), k, show_progress,
                       "text→image", rows)
    return i2t, t2i


def _rerank_rows(
    itc: Tensor, pair_itm: Callable[[int, Tensor], Tensor], k: int, show_progress: bool, description: str,
    log: RowLog | None = None,
) -> Tensor:
    out = torch.full(itc.shape, FILL, dtype=torch.float32, device=itc.device)
    done = log.rows(description) if log is not None else {}
    rows = range(itc.shape[0])
    unit = "images" if description.startswith("image") else "texts"  # the queries of this direction
    for row in progress(rows, len(rows), f"ITM {description}", unit, done="re-ranked") if show_progress else rows:
        if row in done:
            cols, values = done[row]
            out[row, cols] = values.to(itc.device)
            continue
        top = itc[row].topk(min(k, itc.shape[1])).indices  # (k,)
        out[row, top] = pair_itm(row, top).float().to(itc.device) + itc[row, top].float()
        if log is not None:
            log.add(description, row, top, out[row, top])
    return out


class RowLog:
    """Re-ranked rows as JSONL ({"dir", "row", "cols", "scores"}), one flushed line per row. ITM over the top k of
    every row dominates a retrieval run, so a rerun reads these instead of recomputing them."""

    def __init__(self, path: Path) -> None:
        self.done: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
        for r in read_jsonl(path):
            self.done.setdefault(r["dir"], {})[r["row"]] = (torch.tensor(r["cols"]), torch.tensor(r["scores"]))
        self.writer = JsonlLog(path)

    def rows(self, direction: str) -> dict[int, tuple[Tensor, Tensor]]:
        return self.done.get(direction, {})

    def add(self, direction: str, row: int, cols: Tensor, scores: Tensor) -> None:
        self.writer.write({"dir": direction, "row": row, "cols": cols.tolist(), "scores": scores.tolist()})


def gt_ranks(scores: Tensor, positives: Sequence[Sequence[int]]) -> list[int]:
    """Per row, the best 0-based rank of any positive column (higher score first, ties by lower index)."""
    ranks = []
    columns = torch.arange(scores.shape[1], device=scores.device)
    for row, cols in zip(scores, positives):
        ranks.append(min(int(((row > row[c]) | ((row == row[c]) & (columns < c))).sum()) for c in cols))
    return ranks


def gt_ranks_from_rankings(rankings: Sequence[Sequence[int]], positives: Sequence[Sequence[int]]) -> list[float]:
    """Ranks from saved top-k lists; a positive outside the list ranks beyond it (inf)."""
    ranks = []
    for ranked, cols in zip(rankings, positives):
        where = {c: i for i, c in enumerate(ranked)}
        ranks.append(min((where[c] for c in cols if c in where), default=float("inf")))
    return ranks


def top_rankings(scores: Tensor, k: int) -> list[list[int]]:
    """Each row's k best columns, best first, ties by lower index (what `predictions.json` stores)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order.cpu().tolist()


def recall_metrics(txt_ranks: Sequence[float], img_ranks: Sequence[float]) -> dict[str, float]:
    """`txt_r*` from image->text ranks, `img_r*` from text->image ranks; percent, as LAVIS reports them."""

    def recall(ranks: Sequence[float], k: int) -> float:
        return 100.0 * sum(r < k for r in ranks) / len(ranks)

    out = {f"txt_r{k}": recall(txt_ranks, k) for k in (1, 5, 10)}
    out |= {f"img_r{k}": recall(img_ranks, k) for k in (1, 5, 10)}
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def recall_at_k(i2t: Tensor, t2i: Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> dict[str, float]:
    """Recall metrics from the two score matrices, i2t (I, T) and t2i (T, I)."""
    return recall_metrics(gt_ranks(i2t, img2txt), gt_ranks(t2i, [[i] for i in txt2img]))


# ---------------------------------------------------------------------------------------------------------------
# Running a model


def retrieval_scores(
    model: Blip2,
    images: Sequence[Path],
    texts: Sequence[str],
    pixels_fn: Callable[[Sequence[Path]], Tensor],
    batch_size: int,
    k: int,
    text_batch_size: int = 256,
    log: Path | None = None,
    max_text_len: int = 35,
) -> tuple[Tensor, Tensor]:
    """Embed every text and image, then the two-stage scores (texts already cleaned by the caller), texts cut at
    `max_text_len` tokens (LAVIS's retrieval evaluation configs: 35). With `log`, re-ranked rows are kept there and
    a rerun continues where the last one stopped."""
    device = model.device
    with torch.inference_mode():
        text_chunks = [list(texts[i : i + text_batch_size]) for i in range(0, len(texts), text_batch_size)]
        text_feats = torch.cat(
            [model.text_features(c, max_len=max_text_len).float()
             for c in progress(text_chunks, len(texts), "embedding texts", "texts", done="embedded", size=len)]
        )
        feats, embeds = [], []
        image_chunks = [list(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        for chunk in progress(image_chunks, len(images), "embedding images", done="embedded", size=len):
            e = model.vision_embeds(pixels_fn(chunk).to(device))  # (B, N, Dv)
            feats.append(model.image_features(e).float())  # (B, Q, 256)
            embeds.append(e.cpu())  # LAVIS keeps E on the CPU too: 677 x 1408 per image at 364 px
        itc = itc_matrix(torch.cat(feats), text_feats.to(feats[0].device))  # (I, T)
        vision = _on_device_if_it_fits(torch.cat(embeds), device)

        def itm_fn(image_idx: Tensor, text_idx: Tensor) -> Tensor:
            pair_embeds = vision[image_idx.to(vision.device)].to(device)  # (P, N, Dv)
            return model.itm_logits(pair_embeds, [texts[t] for t in text_idx.tolist()], max_len=max_text_len)[:, 1]

        return rerank_scores(itc, itm_fn, k, show_progress=True, log=log)


def _on_device_if_it_fits(embeds: Tensor, device: Any) -> Tensor:
    """Keep E on the GPU when it takes under half of the free memory (saves a copy per ITM batch)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if embeds.numel() * embeds.element_size() < free // 2:
            return embeds.to(device)
    return embeds


def eval_retrieval(
    *,
    annotations: Path,
    predictions: Path | None = None,
    model: str | None = None,
    images: Path | None = None,
    dataset: Literal["coco", "flickr"] = "coco",
    k_test: int = 128,
    max_text_len: int = 35,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    batch_size: int = 16,
    out: Path | None = None,
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score saved rankings, or rank the benchmark with `model`: ITC top `k_test`, then ITM + ITC (LAVIS
    `compute_sim_matrix`), texts cut at `max_text_len` tokens; the ITM re-ranking resumes from `out`/itm_rows.jsonl.
    Writes `out`/scores.json and predictions.json (the top max(k, 10) of every row); returns the record. A hub id
    `model` is downloaded at `revision` into `cache_dir`."""
    check_inputs(predictions, model, images)
    data = ds.read_retrieval_annotations(annotations)
    rankings = None
    if predictions is not None:
        i2t_ranked, t2i_ranked = ds.read_retrieval_predictions(predictions, len(data.images), len(data.texts))
    else:
        paths = ds.resolve_images(images, [[p] for p in data.images])
        check_weights(out, model, quantize)  # before the (long) load
        net, pixels = load_model(model, device, dtype, "retrieval", "eval retrieval", quantize, revision, cache_dir)
        texts = [clean_caption(t) for t in data.texts]
        settings = {"task": f"retrieval-{dataset}", "model": model, "revision": revision, "quantize": quantize,
                    "annotations": str(annotations), "k_test": k_test}
        log = resume_log(out, settings, "itm_rows.jsonl")  # a rerun with the same --out resumes the ITM re-ranking
        i2t, t2i = retrieval_scores(net, paths, texts, pixels, batch_size, k_test, log=log, max_text_len=max_text_len)
        keep = max(k_test, 10)  # beyond k every cell is -100 and ranks by index: the saved lists are lossless
        i2t_ranked, t2i_ranked = top_rankings(i2t, keep), top_rankings(t2i, keep)
        rankings = {"dataset": dataset, "k_test": k_test, "i2t": i2t_ranked, "t2i": t2i_ranked}
    txt_ranks = gt_ranks_from_rankings(i2t_ranked, data.img2txt)
    metrics = recall_metrics(txt_ranks, gt_ranks_from_rankings(t2i_ranked, [[i] for i in data.txt2img]))
    record = {"task": "retrieval", "n_images": len(data.images), "n_texts": len(data.texts), "metrics": metrics}
    if out is not None:
        write_outputs(out, record, rankings)
    return record
