"""Losses against hand-written formulas on tiny tensors, plus one two-process gloo run for the gathers."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from blip2cli.model.losses import (
    IGNORE_INDEX,
    gather_no_grad,
    gather_with_grad,
    itc_loss,
    itc_similarity,
    itg_labels,
    itm_loss,
    itm_pairs,
    lm_loss,
    rank_and_world,
    sample_hard_negatives,
    seq2seq_labels,
    stage2_decoder_labels,
)


def features(B: int, Q: int = 2, D: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, Q, D, generator=g), dim=-1)  # (B, Q, D)
    txt = F.normalize(torch.randn(B, D, generator=g), dim=-1)  # (B, D)
    return img, txt


def hand_similarity(img: torch.Tensor, txt: torch.Tensor) -> list[list[float]]:
    """s[i][t] = max_q sum_d img[i, q, d] * txt[t, d], with explicit loops."""
    Bi, Q, D = img.shape
    Bt = txt.shape[0]
    dot = [[[sum(img[i, q, d].item() * txt[t, d].item() for d in range(D)) for q in range(Q)] for t in range(Bt)]
           for i in range(Bi)]
    return [[max(dot[i][t]) for t in range(Bt)] for i in range(Bi)]


def hand_soft_ce(logits: list[float], target: list[float]) -> float:
    """-sum_j target[j] * log softmax(logits)[j]."""
    log_z = math.log(sum(math.exp(x) for x in logits))
    return -sum(p * (x - log_z) for p, x in zip(target, logits))


def smoothed_onehot(n: int, y: int, eps: float) -> list[float]:
    return [(1 - eps) * (j == y) + eps / n for j in range(n)]


# --- gathers ---------------------------------------------------------------------------------------------------------


def test_gathers_are_identities_without_process_group():
    assert rank_and_world() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    gathered = gather_no_grad(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert gather_with_grad(x) is x


# --- ITC -------------------------------------------------------------------------------------------------------------


def test_itc_loss_matches_hand_computation():
    img, txt = features(B=3, Q=2, D=4)
    temp, eps = 0.07, 0.1
    out = itc_loss(img, txt, torch.tensor(temp))

    s = hand_similarity(img, txt)  # s[i][t]
    assert torch.allclose(itc_similarity(img, txt), torch.tensor(s), atol=1e-6)
    i2t = [[s[b][j] / temp for j in range(3)] for b in range(3)]
    t2i = [[s[j][b] / temp for j in range(3)] for b in range(3)]
    loss_i2t = sum(hand_soft_ce(i2t[b], smoothed_onehot(3, b, eps)) for b in range(3)) / 3
    loss_t2i = sum(hand_soft_ce(t2i[b], smoothed_onehot(3, b, eps)) for b in range(3)) / 3
    assert out.loss.item() == pytest.approx((loss_i2t + loss_t2i) / 2, rel=1e-5)
    assert torch.allclose(out.sim_i2t, torch.tensor(i2t), atol=1e-4)
    assert torch.allclose(out.sim_t2i, torch.tensor(t2i), atol=1e-4)


def test_itc_loss_batch_of_one():
    img, txt = features(B=1)
    out = itc_loss(img, txt, torch.tensor(0.07))
    assert out.sim_i2t.shape == out.sim_t2i.shape == (1, 1)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)  # one class: log-softmax is 0


@pytest.mark.parametrize("temp_value", [1e-4, 10.0])  # outside BLIP v1's clamp range [0.001, 0.5]
def test_temperature_used_as_given_and_learns(temp_value: float):
    img, txt = features(B=3)
    temp = torch.tensor(temp_value, requires_grad=True)
    out = itc_loss(img, txt, temp)
    assert torch.allclose(out.sim_i2t, itc_similarity(img, txt) / temp_value, rtol=1e-5)
    out.loss.backward()
    assert temp.grad is not None and torch.isfinite(temp.grad) and temp.grad != 0


def test_itc_gradient_paths_follow_lavis():
    # The gathered side carries no gradient: images learn from the i2t rows, texts from the t2i rows.
    img, txt = features(B=3)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    temp, y = torch.tensor(0.07), torch.arange(3)
    itc_loss(img, txt, temp).loss.backward()

    img_ref, txt_ref = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    loss_i2t = F.cross_entropy(itc_similarity(img_ref, txt.detach()) / temp, y, label_smoothing=0.1)
    loss_t2i = F.cross_entropy(itc_similarity(img.detach(), txt_ref).t() / temp, y, label_smoothing=0.1)
    ((loss_i2t + loss_t2i) / 2).backward()
    assert torch.allclose(img.grad, img_ref.grad, atol=1e-6)
    assert torch.allclose(txt.grad, txt_ref.grad, atol=1e-6)


def test_multi_positive_matches_spec_formula():
    img, txt = features(B=3)
    ids = torch.tensor([7, 7, 3])
    temp = 0.5
    out = itc_loss(img, txt, torch.tensor(temp), image_ids=ids)

    s = hand_similarity(img, txt)
    # LAVIS Blip2Qformer: P[b, j] = [id_b == id_j]; target = 0.9 * P / sum(P) + 0.1 / (B*W).
    P = [[float(ids[b] == ids[j]) for j in range(3)] for b in range(3)]
    target = [[0.9 * P[b][j] / sum(P[b]) + 0.1 / 3 for j in range(3)] for b in range(3)]
    assert target[0] == pytest.approx([0.45 + 0.1 / 3, 0.45 + 0.1 / 3, 0.1 / 3])
    loss_i2t = sum(hand_soft_ce([s[b][j] / temp for j in range(3)], target[b]) for b in range(3)) / 3
    loss_t2i = sum(hand_soft_ce([s[j][b] / temp for j in range(3)], target[b]) for b in range(3)) / 3
    assert out.loss.item() == pytest.approx((loss_i2t + loss_t2i) / 2, rel=1e-5)


def test_multi_positive_with_unique_ids_equals_default():
    # With one positive per row the spec's target is torch's label smoothing: the two modes agree.
    img, txt = features(B=4)
    temp = torch.tensor(0.07)
    default = itc_loss(img, txt, temp).loss
    multi = itc_loss(img, txt, temp, image_ids=torch.tensor([10, 11, 12, 13], dtype=torch.int32)).loss
    assert multi.item() == pytest.approx(default.item(), rel=1e-6)


@pytest.mark.parametrize("ids", [torch.tensor([1.0, 2.0]), torch.tensor([True, False]), torch.tensor([1, 2, 3])])
def test_bad_image_ids_rejected(ids: torch.Tensor):
    img, txt = features(B=2)
    with pytest.raises(ValueError, match="image_ids"):
        itc_loss(img, txt, torch.tensor(0.07), image_ids=ids)


# --- ITM -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [50.0, 1e5])  # 1e5 ~ cosines / temp 1e-5: beyond LAVIS's -10000 fill
@pytest.mark.parametrize("ids", [None, torch.tensor([0, 1, 1, 2])])
def test_hard_negatives_never_positive(scale: float, ids: torch.Tensor | None):
    B = 4
    sim = torch.full((B, B), -scale)
    sim.fill_diagonal_(scale)
    if ids is not None:
        sim[1, 2] = sim[2, 1] = scale  # same image id: also positives
    positives = (torch.eye(B) > 0) if ids is None else (ids[:, None] == ids[None, :])
    original = sim.clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(500):  # 500 draws x 4 rows x 2 directions
        neg_image, neg_text = sample_hard_negatives(sim, sim.t().contiguous(), ids, generator=g)
        rows = torch.arange(B)
        assert not positives[rows, neg_image].any() and not positives[rows, neg_text].any()
    assert torch.equal(sim, original)  # worked on a copy


def test_hard_negatives_follow_softmax_weights():
    # Row 0: positive at column 0, negatives with weights proportional to e^0, e^log2, e^log4 = 1 : 2 : 4.
    sim = torch.tensor([[9.0, 0.0, math.log(2), math.log(4)]]).repeat(4, 1)
    sim[1:] = torch.eye(4)[1:] * 9  # other rows are irrelevant
    g = torch.Generator().manual_seed(0)
    n = 2000
    counts = torch.zeros(4)
    for _ in range(n):
        neg_image, _ = sample_hard_negatives(sim, sim, None, generator=g)
        counts[neg_image[0]] += 1
    assert counts[0] == 0
    expected = torch.tensor([1.0, 2.0, 4.0]) / 7 * n
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001


def test_hard_negatives_need_a_negative():
    one = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_hard_negatives(one, one, None)
    two = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(two, two, torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="not finite"):
        sample_hard_negatives(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), two, None)


def test_itm_pairs_order():
    text_ids = torch.tensor([[1, 10], [2, 20], [3, 30]])  # (B, T)
    text_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    embeds = torch.arange(3.0).reshape(3, 1, 1).requires_grad_(True)  # (B, N, Dv), value = sample index
    neg_image, neg_text = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    pairs = itm_pairs(text_ids, text_mask, embeds, neg_image, neg_text)
    assert pairs.text_ids[:, 0].tolist() == [1, 2, 3, 1, 2, 3, 2, 3, 1]  # [T_pos; T_pos; T_neg]
    assert pairs.text_mask[:, 1].tolist() == [1, 0, 1, 1, 0, 1, 0, 1, 1]
    assert pairs.image_embeds.flatten().tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]  # [E_pos; E_neg; E_pos]
    pairs.image_embeds.sum().backward()
    assert embeds.grad.flatten().tolist() == [3, 3, 3]  # negatives keep the gradient


def test_itm_loss_labels():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0], [3.0, -1.0], [0.5, 0.5], [2.0, 1.0]])  # B = 2
    labels = [1, 1, 0, 0, 0, 0]
    expected = sum(hand_soft_ce(row, [float(c == y) for c in range(2)]) for row, y in zip(logits.tolist(), labels))
    assert itm_loss(logits, batch_size=2).item() == pytest.approx(expected / 6, rel=1e-6)
    with pytest.raises(ValueError):
        itm_loss(logits, batch_size=3)


# --- LM losses and labels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_lm_loss_matches_hand_formula(eps: float):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)  # (B, T, V)
    labels = torch.tensor([[4, 2, 3, 0], [4, 1, IGNORE_INDEX, IGNORE_INDEX]])  # position 0 is never a target
    losses = []
    for b in range(2):
        for t in range(3):  # logits at t predict labels at t+1
            y = labels[b, t + 1].item()
            if y == IGNORE_INDEX:
                continue
            log_p = torch.log_softmax(logits[b, t].double(), dim=0)
            losses.append((1 - eps) * -log_p[y].item() + eps * -log_p.mean().item())
    assert lm_loss(logits, labels, label_smoothing=eps).item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_lm_loss_without_targets_is_zero():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = lm_loss(logits, torch.full((1, 3), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()


def test_itg_labels_ignore_pads():
    ids = torch.tensor([[30522, 5, 6, 102, 0, 0]])
    assert itg_labels(ids, pad_id=0).tolist() == [[30522, 5, 6, 102, -100, -100]]


def test_stage2_decoder_labels():
    # OPT: BOS 2, pad 1; "</s> a photo of dog \n" with prompt "a photo of" -> 4 masked tokens (BOS included).
    ids = torch.tensor([[2, 10, 11, 12, 13, 50118], [2, 20, 50118, 1, 1, 1]])
    mask = (ids != 1).long()
    labels = stage2_decoder_labels(ids, mask, torch.tensor([4, 0]), num_prefix=3)
    assert labels.tolist() == [
        [-100, -100, -100, -100, -100, -100, -100, 13, 50118],
        [-100, -100, -100, 2, 20, 50118, -100, -100, -100],  # empty prompt: BOS is a target
    ]
    # Left padding: the prompt is counted from the first real token.
    left = torch.tensor([[1, 1, 2, 20, 21, 50118]])
    labels = stage2_decoder_labels(left, (left != 1).long(), 2, num_prefix=0)
    assert labels.tolist() == [[-100, -100, -100, -100, 21, 50118]]


def test_seq2seq_labels_ignore_pads():
    ids = torch.tensor([[5, 6, 1, 0]])
    assert seq2seq_labels(ids, torch.tensor([[1, 1, 1, 0]])).tolist() == [[5, 6, 1, -100]]


# --- two processes ---------------------------------------------------------------------------------------------------


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # gather_with_grad: rank r's loss weighs the gathered (4, 2) tensor with (r + 1) * arange.
        x = (torch.arange(4.0).reshape(2, 2) + 10 * rank).requires_grad_(True)
        gathered = gather_with_grad(x)
        (gathered * torch.arange(8.0).reshape(4, 2) * (rank + 1)).sum().backward()

        img, txt = features(B=4, seed=1)
        ids = torch.tensor([5, 1, 5, 2])
        local = slice(2 * rank, 2 * rank + 2)
        out = itc_loss(img[local], txt[local], torch.tensor(0.07))
        multi = itc_loss(img[local], txt[local], torch.tensor(0.07), image_ids=ids[local])
        draws = [sample_hard_negatives(multi.sim_i2t, multi.sim_t2i, ids[local]) for _ in range(50)]
        torch.save(
            {
                "gathered": gathered.detach(),
                "grad": x.grad,
                "no_grad": gather_no_grad(x),
                "loss": out.loss.detach(),
                "sim_i2t": out.sim_i2t.detach(),
                "multi_loss": multi.loss.detach(),
                "neg_image": torch.stack([d[0] for d in draws]),
                "neg_text": torch.stack([d[1] for d in draws]),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gather_and_itc(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    x_all = torch.cat([torch.arange(4.0).reshape(2, 2), torch.arange(4.0).reshape(2, 2) + 10])
    assert torch.equal(r0["gathered"], x_all) and torch.equal(r1["no_grad"], x_all)
    summed = torch.arange(8.0).reshape(4, 2) * (1 + 2)  # sum over ranks of each rank's weights
    assert torch.equal(r0["grad"], summed[:2]) and torch.equal(r1["grad"], summed[2:])

    img, txt = features(B=4, seed=1)
    ids = torch.tensor([5, 1, 5, 2])
    single = itc_loss(img, txt, torch.tensor(0.07))
    assert torch.allclose(torch.cat([r0["sim_i2t"], r1["sim_i2t"]]), single.sim_i2t, atol=1e-5)
    assert ((r0["loss"] + r1["loss"]) / 2).item() == pytest.approx(single.loss.item(), rel=1e-5)
    multi = itc_loss(img, txt, torch.tensor(0.07), image_ids=ids)
    assert ((r0["multi_loss"] + r1["multi_loss"]) / 2).item() == pytest.approx(multi.loss.item(), rel=1e-5)

    for r, res in enumerate((r0, r1)):  # global indices, never a same-id sample
        local_ids = ids[2 * r : 2 * r + 2]
        assert (ids[res["neg_image"]] != local_ids).all() and (ids[res["neg_text"]] != local_ids).all()
