"""Every loss against a value worked out by hand (explicit loops and formulas, not the same code)."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from blitext.errors import BlitextError
from blitext.losses import (alignment_loss, centred_alignment_loss, contrastive_alignment_loss, contrastive_loss,
                            nearest_embedding_rows, reference_scales, vocab_loss)
from blitext.models.llm import LMBatch
from blitext.models.loading import load_llm


# ---------------------------------------------------------------- contrastive

def _smoothed_ce_by_hand(logits: list[list[float]], targets: list[int], eps: float) -> float:
    """(1 - eps) * CE + eps * mean over classes of -log softmax, averaged over rows."""
    total = 0.0
    for row, t in zip(logits, targets):
        log_z = math.log(sum(math.exp(x) for x in row))
        logp = [x - log_z for x in row]
        total += (1 - eps) * -logp[t] + eps * sum(-lp for lp in logp) / len(row)
    return total / len(logits)


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


Z_A = _unit([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
Z_B = _unit([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def test_contrastive_two_view_matches_hand_formula():
    temp = 0.1
    logits = [[sum(a * b for a, b in zip(za, zb)) / temp for zb in Z_B.tolist()] for za in Z_A.tolist()]
    expected = _smoothed_ce_by_hand(logits, [0, 1, 2], eps=0.1)
    got = contrastive_loss(Z_A, Z_B, torch.tensor(temp, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_one_view_differs_and_matches_hand_formula():
    temp = 0.1
    logits = [[sum(a * b for a, b in zip(za, zb)) / temp for zb in Z_A.tolist()] for za in Z_A.tolist()]
    one_view = contrastive_loss(Z_A, Z_A, temp)
    assert one_view.item() == pytest.approx(_smoothed_ce_by_hand(logits, [0, 1, 2], 0.1), rel=1e-6)
    assert abs(one_view.item() - contrastive_loss(Z_A, Z_B, temp).item()) > 1e-3


def test_contrastive_temperature_is_clamped():
    assert contrastive_loss(Z_A, Z_B, 2.0).item() == pytest.approx(contrastive_loss(Z_A, Z_B, 0.5).item())
    assert contrastive_loss(Z_A, Z_B, 1e-5).item() == pytest.approx(contrastive_loss(Z_A, Z_B, 1e-3).item())


SPLITS = {"equal": [3, 3], "unequal": [4, 2]}  # rows per rank of a 6-row batch; a last partial batch is unequal


def _contrastive_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z_a, z_b, temp = torch.load(f"{out_dir}/inputs.pt")
        for name, sizes in SPLITS.items():
            rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
            local_a = z_a[rows].clone().requires_grad_(True)
            local_b = z_b[rows].clone().requires_grad_(True)
            loss = contrastive_loss(local_a, local_b, temp)
            # weighted by this rank's share of the rows: the ranks' weighted losses sum to the
            # full-batch mean, so the gathered gradients must sum to its gradient (with equal
            # batches the weight is 1/world: what DDP's gradient averaging applies)
            (loss * sizes[rank] / z_a.shape[0]).backward()
            torch.save((loss.detach(), local_a.grad, local_b.grad), f"{out_dir}/{name}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_contrastive_two_ranks_equal_full_batch(tmp_path):
    """Each rank's loss on its rows with negatives gathered from both ranks = the full-batch loss."""
    import torch.multiprocessing as mp

    world, n, d = 2, 6, 8
    g = torch.Generator().manual_seed(0)
    z_a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    z_b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    temp = torch.tensor(0.07, dtype=torch.float64)
    torch.save((z_a, z_b, temp), tmp_path / "inputs.pt")
    mp.spawn(_contrastive_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)

    full_a, full_b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
    full = contrastive_loss(full_a, full_b, temp)
    full.backward()
    for name, sizes in SPLITS.items():
        results = [torch.load(tmp_path / f"{name}{r}.pt") for r in range(world)]
        # the full-batch mean over n rows is the rank means weighted by their row counts
        weighted = sum(loss.item() * size / n for (loss, _, _), size in zip(results, sizes))
        assert weighted == pytest.approx(full.item(), abs=1e-9), name
        for r, (_, grad_a, grad_b) in enumerate(results):
            rows = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
            torch.testing.assert_close(grad_a, full_a.grad[rows], atol=1e-6, rtol=0)
            torch.testing.assert_close(grad_b, full_b.grad[rows], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- vocab

CODEBOOK = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-2.0, -2.0]])


def test_vocab_loss_nearest_rows_and_gradient():
    prompts = torch.tensor([[[0.9, 0.2], [0.1, 0.1]], [[-1.5, -1.0], [0.3, 0.8]]], requires_grad=True)  # (2, 2, 2)
    # nearest rows by hand: (0.9,0.2)->1, (0.1,0.1)->0, (-1.5,-1.0)->3, (0.3,0.8)->2
    assert nearest_embedding_rows(prompts.detach().reshape(-1, 2), CODEBOOK).tolist() == [1, 0, 3, 2]
    q = CODEBOOK[[1, 0, 3, 2]].view(2, 2, 2)
    diffs = [(0.9 - 1) ** 2, 0.2 ** 2, 0.1 ** 2, 0.1 ** 2, 0.5 ** 2, 1.0 ** 2, 0.3 ** 2, 0.2 ** 2]
    codebook = CODEBOOK.clone().requires_grad_(True)
    loss = vocab_loss(prompts, codebook)
    assert loss.item() == pytest.approx(sum(diffs) / 8, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(prompts.grad, 2 * (prompts.detach() - q) / 8)
    assert codebook.grad is None


def test_nearest_rows_matches_brute_force_over_chunks():
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(50, 16, generator=g, dtype=torch.float64)
    embedding = torch.randn(37, 16, generator=g, dtype=torch.float64)
    expected = torch.cdist(vectors, embedding).argmin(dim=1)
    for chunk in (5, 10, 37, 4096):  # 8, 4, 1, 1 chunks
        assert torch.equal(nearest_embedding_rows(vectors, embedding, chunk=chunk), expected)


def test_nearest_rows_upcasts_half_precision():
    embedding = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float16)
    vectors = torch.tensor([[0.49, 0.0], [0.51, 0.0]], dtype=torch.float16)
    assert nearest_embedding_rows(vectors, embedding).tolist() == [0, 1]


# ---------------------------------------------------------------- alignment

def test_alignment_loss_value_gradient_and_shape_error():
    prompts = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)  # (1, 2, 2)
    reference = torch.tensor([[[1.5, 2.0], [2.0, 6.0]]], requires_grad=True)
    loss = alignment_loss(prompts, reference)
    assert loss.item() == pytest.approx((0.25 + 0 + 1 + 4) / 4)
    loss.backward()
    assert reference.grad is None
    torch.testing.assert_close(prompts.grad, 2 * (prompts.detach() - reference.detach()) / 4)
    with pytest.raises(BlitextError, match=r"\(1, 2, 2\).*\(1, 2, 3\)"):
        alignment_loss(prompts, torch.zeros(1, 2, 3))


def test_centred_alignment_weighs_what_tells_captions_apart():
    torch.manual_seed(0)
    shared = torch.randn(1, 2, 8)
    reference = shared + 0.1 * torch.randn(16, 2, 8)  # mostly one constant, as a small P-Former's references
    scales = reference_scales(reference)
    mean = reference.mean(0)
    assert scales == pytest.approx({"mean_square": mean.pow(2).mean().item(),
                                    "spread_square": (reference - mean).pow(2).mean().item()})
    assert centred_alignment_loss(reference, reference, **scales).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = mean.expand_as(reference).clone().requires_grad_()  # the one mean prompt for every image
    # the paper's MSE calls it nearly perfect (a hundredth of the prompts' size); centred, its whole spread is missing
    assert alignment_loss(collapsed, reference).item() < 0.02 * reference.pow(2).mean().item()
    loss = centred_alignment_loss(collapsed, reference, **scales)
    assert loss.item() == pytest.approx(1.0, rel=1e-5)
    loss.backward()
    by_hand = -2 * (reference - mean) / reference.numel() / scales["spread_square"]  # the mean part is matched
    torch.testing.assert_close(collapsed.grad, by_hand)
    with pytest.raises(BlitextError, match=r"\(16, 2, 8\).*\(16, 2, 3\)"):
        centred_alignment_loss(collapsed, torch.zeros(16, 2, 3), **scales)


def test_contrastive_alignment_is_not_met_by_the_mean_prompt_and_masks_same_captions():
    torch.manual_seed(0)
    shared = torch.randn(1, 2, 8)
    distinct = shared + 0.1 * torch.randn(6, 2, 8)
    reference = torch.cat([distinct, distinct[:2]])  # rows 6, 7 repeat the captions of rows 0, 1
    mean = reference.mean(0)
    spread = reference_scales(reference)["spread_square"]
    loss = partial(contrastive_alignment_loss, mean_prompt=mean, spread_square=spread, weight=4.0, temp=0.05)
    collapsed = mean.expand_as(reference).clone()  # near the paper's MSE floor
    assert alignment_loss(collapsed, reference).item() < 0.02 * reference.pow(2).mean().item()
    perfect, shuffled = loss(reference, reference), loss(reference[[1, 2, 3, 4, 5, 0, 7, 6]], reference)
    assert perfect.item() < 0.01  # its own reference: the InfoNCE is (near) 0 and so is the MSE
    assert loss(collapsed + 1e-3 * torch.randn_like(collapsed), reference).item() > 4 * math.log(6) * 0.8
    assert shuffled.item() > 10 * perfect.item()
    # rows 0 and 6 hold the same caption: neither is the other's negative, so this prediction costs nothing more
    swapped = reference[[6, 1, 2, 3, 4, 5, 0, 7]]
    torch.testing.assert_close(loss(swapped, reference), perfect)
    no_contrast = contrastive_alignment_loss(collapsed, reference, mean, spread, weight=0.0)
    assert no_contrast.item() == pytest.approx(alignment_loss(collapsed, reference).item() / spread, rel=1e-5)


def test_contrastive_alignment_bank_adds_the_captions_a_batch_lacks():
    """A bank caption near the image's prompt competes with its own reference (the batch alone
    would not see it); the bank's copy of the image's own caption is no negative."""
    torch.manual_seed(0)
    shared = torch.randn(1, 2, 8)
    distinct = shared + 0.1 * torch.randn(5, 2, 8)
    reference, absent = distinct[:3], distinct[3:]
    mean, spread = distinct.mean(0), reference_scales(distinct)["spread_square"]
    prompts = reference + 0.5 * (absent[[0, 0, 1]] - reference)  # halfway towards captions absent from the batch
    alone = contrastive_alignment_loss(prompts, reference, mean, spread, weight=4.0, temp=0.05)
    banked = contrastive_alignment_loss(prompts, reference, mean, spread, weight=4.0, temp=0.05, negatives=absent)
    assert banked.item() > alone.item() + 1.0
    own_copy = contrastive_alignment_loss(prompts[:1], reference[:1], mean, spread, weight=4.0, temp=0.05,
                                          negatives=reference[:1].clone())
    torch.testing.assert_close(own_copy, F.mse_loss(prompts[:1], reference[:1]) / spread)  # its only candidate: itself
    one_row = contrastive_alignment_loss(prompts[:1], reference[:1], mean, spread, weight=4.0, temp=0.05,
                                         negatives=absent)
    assert one_row.item() > contrastive_alignment_loss(prompts[:1], reference[:1], mean, spread).item()


# ---------------------------------------------------------------- frozen LLM

def _lm_loss_by_hand(llm, prompts, texts: list[list[int]]) -> float:
    """Each sample alone, unpadded: sum of -log p(token) at each text position, over all tokens."""
    total, count = 0.0, 0
    for b, ids in enumerate(texts):
        seq = torch.cat([prompts[b], llm.embed(torch.tensor(ids))])[None]  # (1, P+L_b, D)
        logp = torch.log_softmax(llm.model(inputs_embeds=seq).logits[0].double(), dim=-1)  # (P+L_b, V)
        P = prompts.shape[1]
        for j, token in enumerate(ids):
            total -= logp[P + j - 1, token].item()
            count += 1
    return total / count


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_prompt_lm_loss_matches_hand_computation(llm_folders, kind):
    llm = load_llm(str(llm_folders[kind]))
    torch.manual_seed(0)
    D = llm.width
    prompts = torch.randn(2, 3, D, requires_grad=True)  # (B, P, D)
    texts = [[5, 17, 40, 8, 2], [11, 60]]
    input_ids = torch.tensor([[5, 17, 40, 8, 2], [11, 60, 0, 0, 0]])  # right padding with an arbitrary id
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    loss = llm.lm_loss(prompts, LMBatch({"input_ids": input_ids, "attention_mask": attention_mask,
                                         "loss_mask": attention_mask}))
    with torch.no_grad():
        expected = _lm_loss_by_hand(llm, prompts, texts)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.model.parameters())
