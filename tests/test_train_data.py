"""train.data: the epoch plan over ranks, text formats and webdataset shards."""

from __future__ import annotations

import json

import pytest
import torch


from tests.training import RECIPE, run_cli, sets_for

pytestmark = pytest.mark.usefixtures("one_thread")


def test_epoch_plan_splits_ranks_and_resumes_mid_epoch():
    from itertools import islice

    from blip2cli.train.data import EpochPlan

    plans = [EpochPlan([7, 5], [1.0, 2.0], seed=3, micro=2, world=2, rank=r) for r in (0, 1)]
    assert plans[0].per_epoch == 17 and plans[0].batches_per_epoch == 4  # 17 draws, rounds of 4, 1 dropped
    epoch0 = [list(islice(p.batches(0), 4)) for p in plans]
    seen = [item[:2] for rank in epoch0 for batch in rank for item in batch]
    assert len(seen) == 16 and sum(1 for s, _ in seen if s == 1) >= 9  # the weight-2 source appears twice as often
    assert not {b[0][2] for b in epoch0[0]} & {b[0][2] for b in epoch0[1]}  # disjoint draws
    whole = list(islice(plans[0].batches(0), 10))
    assert list(islice(plans[0].batches(6), 4)) == whole[6:]  # resuming at micro-batch 6 (epoch 1) = never stopping
    assert whole[:4] != whole[4:8]  # each epoch reshuffles


def test_text_formats(assets):
    import random

    from blip2cli.train.data import TextFormat

    rng = random.Random(0)
    caption = {"text": "a dog running on the beach"}
    assert TextFormat("qformer")(caption, rng) == {"input": "a dog running on the beach"}
    assert TextFormat("decoder", "a photo of")(caption, rng) == {"input": "a photo of a dog running on the beach"}
    split = TextFormat("seq2seq_split")(caption, rng)
    assert f"{split['input']} {split['output']}" == caption["text"] and 1 <= len(split["input"].split()) <= 3
    prompted = TextFormat("seq2seq_prompt", "a photo of")(caption, rng)
    assert prompted == {"input": "a photo of", "output": caption["text"]}
    question = {"text": "what is the dog doing?", "answers": ["Running"]}
    asked = "Question: what is the dog doing? Answer:"
    assert TextFormat("vqa_decoder", template="Question: {} Answer:")(question, rng) == {
        "input": f"{asked} running", "prompt": asked}
    assert TextFormat("vqa_seq2seq", template="Q: {} A:")(question, rng) == {"input": "Q: what is the dog doing? A:",
                                                                            "output": "running"}


def test_webdataset_shards_train(assets, tmp_path):
    """Shard streams run endlessly with a nominal epoch of `size` samples."""
    import io

    import webdataset as wds

    captions = json.loads(assets["captions"].read_text())
    files = {i["id"]: i["file_name"] for i in captions["images"]}
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(shards / f"{shard:05d}.tar")) as sink:
            for k, ann in enumerate(captions["annotations"][shard * 6:shard * 6 + 6]):
                buffer = io.BytesIO((assets["images"] / files[ann["image_id"]]).read_bytes())
                sink.write({"__key__": f"{shard:05d}{k:04d}", "jpg": buffer.getvalue(), "txt": ann["caption"]})
    sets = sets_for(assets, 5, **{"data.train[0].kind": "webdataset", "data.train[0].path": shards,
                               "data.train[0].image_root": "", "data.train[0].size": 12, "data.val": "[]"})
    lines = run_cli(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "wds"), "--json", *sets])
    assert lines[-1]["step"] == 5 and lines[-2]["epoch"] == pytest.approx(10 / 3, abs=1e-3)


def test_per_sample_prompts_equal_the_batch_prompt_when_they_agree(tiny_opt_dir):
    from blip2cli.model.load import load_model
    from tests import tiny

    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    px, texts = tiny.pixels(2), ["a photo of a dog", "a photo of two cats on a pink blanket"]
    with torch.no_grad():
        ours = model.stage2_loss(px, texts, ["a photo of"] * 2).loss
        reference = model.stage2_loss(px, texts, "a photo of").loss
        other = model.stage2_loss(px, texts, ["a photo", "a photo of two cats"]).loss
    assert abs(float(ours) - float(reference)) < 1e-6 and abs(float(other) - float(reference)) > 1e-4
