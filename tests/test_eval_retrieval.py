import json
import math

import pytest
import torch

from blip2cli.errors import UsageError
from blip2cli.eval import datasets as ds
from blip2cli.eval.retrieval import (
    gt_ranks,
    gt_ranks_from_rankings,
    itc_matrix,
    recall_at_k,
    recall_metrics,
    rerank_scores,
    top_rankings,
)


def test_recall_hand_count():
    # 3 images with 2 captions each (texts 0-1 -> image 0, 2-3 -> image 1, 4-5 -> image 2)
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    i2t = torch.tensor([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # best own caption first -> rank 0
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # own captions at positions 2, 3 -> rank 2
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # caption 5 is the best -> rank 0
    ])  # fmt: skip
    t2i = torch.tensor([
        [0.9, 0.0, 0.0],  # rank 0
        [0.1, 0.9, 0.0],  # rank 1
        [0.0, 0.1, 0.9],  # own image 1 ranks 1
        [0.0, 0.9, 0.0],  # rank 0
        [0.9, 0.5, 0.1],  # own image 2 ranks 2
        [0.5, 0.5, 0.5],  # a three-way tie: ties go to the lower index, so image 2 ranks 2
    ])  # fmt: skip
    assert gt_ranks(i2t, img2txt) == [0, 2, 0]
    assert gt_ranks(t2i, [[i] for i in txt2img]) == [0, 1, 1, 0, 2, 2]
    m = recall_at_k(i2t, t2i, img2txt, txt2img)
    assert m["txt_r1"] == pytest.approx(200 / 3)
    assert m["txt_r5"] == m["txt_r10"] == 100.0
    assert m["img_r1"] == pytest.approx(100 * 2 / 6)
    assert m["img_r5"] == 100.0
    assert m["txt_r_mean"] == pytest.approx((200 / 3 + 200) / 3)
    assert m["img_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_rankings_give_the_same_ranks():
    scores = torch.randn(7, 30)
    positives = [[i, i + 7] for i in range(7)]
    assert gt_ranks_from_rankings(top_rankings(scores, 30), positives) == gt_ranks(scores, positives)
    short = gt_ranks_from_rankings(top_rankings(scores, 3), positives)
    assert [r if r < 3 else math.inf for r in gt_ranks(scores, positives)] == short


def test_recall_at_10_counts_ranks_below_10():
    ranks = [0, 4, 5, 9, 10, math.inf]
    m = recall_metrics(ranks, ranks)
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == pytest.approx((100 / 6, 200 / 6, 400 / 6))


def test_itc_is_max_over_queries():
    image = torch.nn.functional.normalize(torch.randn(3, 32, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    expected = torch.stack([torch.stack([(image[i] @ text[t]).max() for t in range(5)]) for i in range(3)])
    assert torch.allclose(itc_matrix(image, text, chunk=2), expected)


def test_rerank_scores_hand_case():
    itc = torch.tensor([
        [0.5, 0.1, 0.3, 0.2],
        [0.0, 0.4, 0.6, 0.1],
        [0.2, 0.3, 0.1, 0.7],
    ])  # fmt: skip
    calls = []

    def itm(images, texts):  # a recognisable logit for each (image, text) pair
        calls.append((images.tolist(), texts.tolist()))
        return 10.0 * images + texts

    i2t, t2i = rerank_scores(itc, itm, k=2)
    fill = -100.0
    expected_i2t = torch.tensor([
        [0 + 0.5, fill, 2 + 0.3, fill],  # top 2 of image 0: texts 0, 2
        [fill, 11 + 0.4, 12 + 0.6, fill],  # texts 2, 1
        [fill, 21 + 0.3, fill, 23 + 0.7],  # texts 3, 1
    ])  # fmt: skip
    expected_t2i = torch.tensor([
        [0 + 0.5, fill, 20 + 0.2],  # text 0: images 0, 2
        [fill, 11 + 0.4, 21 + 0.3],  # text 1: images 1, 2
        [2 + 0.3, 12 + 0.6, fill],  # text 2: images 1, 0
        [3 + 0.2, fill, 23 + 0.7],  # text 3: images 2, 0
    ])  # fmt: skip
    assert torch.allclose(i2t, expected_i2t)
    assert torch.allclose(t2i, expected_t2i)
    assert len(calls) == 3 + 4  # one ITM call of k pairs per row, in each direction
    assert calls[0] == ([0, 0], [0, 2])
    assert calls[3] == ([0, 2], [0, 0])


def test_read_retrieval_annotations(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([
        {"image": "flickr30k-images/1.jpg", "caption": ["a dog", "a brown dog"]},
        {"image": "flickr30k-images/2.jpg", "caption": ["a cat"]},
    ]))  # fmt: skip
    data = ds.read_retrieval_annotations(path)
    assert data.images == ["flickr30k-images/1.jpg", "flickr30k-images/2.jpg"]
    assert data.texts == ["a dog", "a brown dog", "a cat"]
    assert data.img2txt == [[0, 1], [2]]
    assert data.txt2img == [0, 0, 1]
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(UsageError, match="not a COCO caption file.*VQA question file"):
        ds.read_retrieval_annotations(path)


def test_rerank_resumes_from_its_row_log(tmp_path):
    """A run stopped part-way: logged rows are read back, the rest computed; the result equals one run."""
    from blip2cli.eval.retrieval import rerank_scores

    itc = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    calls = []

    def itm(images, texts):
        calls.append(len(images))
        return (images * 10 + texts).float() / 100

    full_i2t, full_t2i = rerank_scores(itc, itm, k=3)
    log = tmp_path / "rows.jsonl"
    rerank_scores(itc, itm, k=3, log=log)
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:6]) + "\n" + lines[6][:10])  # killed while writing row 7
    calls.clear()
    i2t, t2i = rerank_scores(itc, itm, k=3, log=log)
    assert torch.equal(i2t, full_i2t) and torch.equal(t2i, full_t2i)
    assert len(calls) == 5 + 7 - 6  # only the rows not logged were computed again
