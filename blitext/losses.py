"""Every loss of blitext, in one place, by the stage that uses it (docs/method.md#losses-at-a-glance).

- Frozen LLM:  text_lm_loss (P-Former L_lm and the stage-2 captioning loss).
- P-Former (stage 0):  contrastive_loss (L_contrast, SimCSE), vocab_loss (L_vocab) and its
  nearest_embedding_rows search.
- Adaptor (stages 1, 2):  itc_loss, itm_negatives + itm_loss, itg_loss (BLIP-2's stage 1),
  alignment_loss (L_align, to the P-Former's reference prompts), and its options
  centred_alignment_loss and contrastive_alignment_loss.

Losses are plain functions of tensors (and the frozen LLM): the trainers own the models,
the weights (w1, w2) and the optimisers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from blitext.errors import BlitextError

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt slots, padding), as in transformers

# BLIP clamps its learnable contrastive temperature to this range: below 0.001 the logits
# (cosines / temp, up to 1000) overflow fp16 and the softmax is one-hot; above 0.5 every
# pair looks alike and the loss stops separating them. Trainers should also clamp the
# parameter itself in place after each optimiser step (BLIP does), so it cannot drift past
# a bound where the clamp below gives it no gradient.
TEMP_MIN, TEMP_MAX = 0.001, 0.5


# ---------------------------------------------------------------- frozen LLM

def text_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the frozen LLM's logits (N, V) for its target tokens (N,): P-Former L_lm and
    the stage-2 captioning loss. Positions labelled IGNORE_INDEX (prompt slots, a text prefix,
    padding) carry no loss; mean over the rest. blitext.models.llm computes the logits, after the
    soft prompts, for either family of LLM."""
    return F.cross_entropy(_at_least_fp32(logits), targets, ignore_index=IGNORE_INDEX)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 at least: an fp16 softmax over a vocabulary loses the small probabilities."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------- P-Former (stage 0)

def contrastive_loss(z_a: torch.Tensor, z_b: torch.Tensor, temp: torch.Tensor | float,
                     label_smoothing: float = 0.1) -> torch.Tensor:
    """InfoNCE of z_a (B, d) against z_b (B, d) gathered from every rank; both L2-normalised.

    The positive of local sample i is z_b[i] (global index offset + i); every other gathered
    row is a negative. Two-view SimCSE (the paper): z_b is the same sentences encoded again
    under another dropout mask. One view (the authors' code): pass z_b = z_a.

    Under torch.distributed the gather is differentiable, so the local gradient includes
    what the other ranks' losses send back: it equals world x the gradient of the mean loss
    over ranks, which DDP's gradient averaging divides back. Ranks may hold different batch
    sizes (a last partial batch).
    """
    if not torch.is_tensor(temp):
        temp = torch.tensor(temp, device=z_a.device)
    temp = temp.clamp(TEMP_MIN, TEMP_MAX)
    z_all, offset = _gather_with_grad(z_b)  # (N, d), N = sum of every rank's batch
    logits = z_a @ z_all.T / temp  # (B, N)
    targets = torch.arange(z_a.shape[0], device=z_a.device) + offset  # (B,)
    return F.cross_entropy(_at_least_fp32(logits), targets, label_smoothing=label_smoothing)


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for every slot and keeps its own slot.

    Written here, as LAVIS's GatherLayer is, because torch.distributed.nn's all_gather runs its
    backward through gloo's all-to-all, which aborts a process at exit now and then
    ("terminate called without an active exception", about 1 run in 8 on torch 2.13).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        summed = torch.stack(grads)  # (world, ...) this rank's gradient for every rank's slot
        dist.all_reduce(summed)
        return summed[dist.get_rank()]


def _gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' z concatenated (gradient flows back to each rank's own rows), and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    size = torch.tensor([z.shape[0]], device=z.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)  # gathering needs equal shapes: pad to the largest batch, then cut
    sizes = [int(s) for s in sizes]
    padded = F.pad(z, (0, 0, 0, max(sizes) - z.shape[0]))  # (max B, d)
    parts = _AllGather.apply(padded)
    z_all = torch.cat([part[:n] for part, n in zip(parts, sizes)])  # (N, d)
    return z_all, sum(sizes[:dist.get_rank()])


@torch.no_grad()
def nearest_embedding_rows(vectors: torch.Tensor, embedding: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index (N,) of the row of embedding (V, D) nearest to each of vectors (N, D), by squared L2.

    ||v - e||^2 = ||v||^2 - 2 v.e + ||e||^2 and ||v||^2 is the same for every candidate of a
    row, so argmin(||e||^2 - 2 v.e) suffices. The vocabulary is scanned in chunks so memory
    stays O(N x chunk), never (N x V). Ties go to the lowest index, like argmin.
    """
    dtype = torch.promote_types(vectors.dtype, torch.float32)  # fp16 distances lose the nearest row
    v = vectors.to(dtype)  # (N, D)
    best = torch.full((v.shape[0],), float("inf"), dtype=dtype, device=v.device)  # (N,)
    best_idx = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)  # (N,)
    for start in range(0, embedding.shape[0], chunk):
        e = embedding[start:start + chunk].to(device=v.device, dtype=dtype)  # (C, D)
        dist_part = (e * e).sum(-1) - 2 * v @ e.T  # (N, C)
        d, i = dist_part.min(dim=1)  # (N,), (N,)
        closer = d < best  # strict: an earlier chunk keeps a tie
        best = torch.where(closer, d, best)
        best_idx = torch.where(closer, i + start, best_idx)
    return best_idx


def vocab_loss(prompts: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """MSE between each prompt vector (B, P, D) and its nearest LLM input-embedding row (V, D).

    A VQ-VAE commitment term: it pulls the prompts towards real tokens; the codebook (the
    frozen LLM's embedding matrix) is a constant and is never updated.
    """
    flat = _at_least_fp32(prompts.reshape(-1, prompts.shape[-1]))  # (B*P, D)
    idx = nearest_embedding_rows(flat.detach(), embedding)  # (B*P,)
    nearest = embedding.detach()[idx].to(device=flat.device, dtype=flat.dtype)  # (B*P, D)
    return F.mse_loss(flat, nearest)


# ---------------------------------------------------------------- adaptor (stages 1, 2)

def alignment_loss(prompts: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L_align: MSE between the prompts the LLM will see (B, P, D) and the P-Former's (B, P, D).

    Unnormalised, averaged over all elements; the reference is a constant (no gradient).
    """
    _require_same_shape(prompts, reference)
    prompts = _at_least_fp32(prompts)
    return F.mse_loss(prompts, reference.detach().to(device=prompts.device, dtype=prompts.dtype))


def _require_same_shape(prompts: torch.Tensor, reference: torch.Tensor) -> None:
    if prompts.shape != reference.shape:
        raise BlitextError(
            f"alignment loss: the adaptor's prompts have shape {tuple(prompts.shape)} but the reference "
            f"prompts have shape {tuple(reference.shape)} (batch, n_prompt, d_llm); the reference prompts "
            f"were built for another LLM or P-Former: rebuild them (build-prompts) with this run's LLM, "
            f"or set n_prompt to match"
        )


# mse: the paper's L_align; centred: its shared and per-image parts apart; contrastive: MSE over the
# references' spread + InfoNCE "which caption's reference is this image's prompt nearest?"
ALIGN_LOSSES = ("mse", "centred", "contrastive")


def reference_scales(reference: torch.Tensor) -> dict[str, float]:
    """The references' mean prompt's mean square and their between-caption variance (N, P, D):
    the sizes the centred and contrastive alignments divide by."""
    reference = reference.float()
    mean = reference.mean(0)
    return {"mean_square": mean.pow(2).mean().item(), "spread_square": (reference - mean).pow(2).mean().item()}


def centred_alignment_loss(prompts: torch.Tensor, reference: torch.Tensor, mean_square: float,
                           spread_square: float) -> torch.Tensor:
    """L_align split into the batch's mean prompt and each image's deviation from it, each over its
    size in the references (reference_scales), so the part that tells captions apart weighs as much
    as the part every caption shares. With the paper's MSE the shared part dominates when the
    references barely vary (docs/method.md#centred-alignment): an adaptor that writes the one mean
    prompt for every image scores nearly as well as one that follows the image. The batch is this
    rank's share of it. Averaged over elements; the reference is a constant."""
    _require_same_shape(prompts, reference)
    p = _at_least_fp32(prompts)
    r = reference.detach().to(device=p.device, dtype=p.dtype)
    p_mean, r_mean = p.mean(0, keepdim=True), r.mean(0, keepdim=True)
    return F.mse_loss(p_mean, r_mean) / max(mean_square, 1e-12) + \
        F.mse_loss(p - p_mean, r - r_mean) / max(spread_square, 1e-12)


def contrastive_alignment_loss(prompts: torch.Tensor, reference: torch.Tensor, mean_prompt: torch.Tensor,
                               spread_square: float, weight: float = 4.0, temp: float = 0.05,
                               negatives: torch.Tensor | None = None) -> torch.Tensor:
    """L_align that asks "which caption is this image's?" (docs/method.md#contrastive-alignment).

    MSE(prompts, reference) over the references' between-caption variance, plus `weight` x an
    InfoNCE: the cosine between each image's flattened prompts (B, P*D) and every candidate
    caption's reference, both minus the references' mean prompt (P, D), at temperature `temp`; the
    target is the row's own reference. The candidates are the batch's references and, when given,
    `negatives` (K, P, D): a fixed bank of the run's references, so that every step also meets the
    captions its batch lacks. A candidate identical to the row's own reference (the same caption)
    is left out. The paper's MSE is met by writing the references' mean for every image when they
    barely vary; the InfoNCE term is not. The batch is this rank's share of it; the reference,
    its mean and the bank are constants."""
    _require_same_shape(prompts, reference)
    p = _at_least_fp32(prompts)
    r = reference.detach().to(device=p.device, dtype=p.dtype)
    mean = mean_prompt.detach().to(device=p.device, dtype=p.dtype)
    mse = F.mse_loss(p, r) / max(spread_square, 1e-12)
    if weight == 0 or (len(p) < 2 and negatives is None):
        return mse
    candidates = r if negatives is None else torch.cat([r, negatives.detach().to(device=p.device, dtype=p.dtype)])
    pz = F.normalize((p - mean).flatten(1), dim=-1)           # (B, P*D)
    cz = F.normalize((candidates - mean).flatten(1), dim=-1)  # (B + K, P*D)
    own = torch.arange(len(p), device=p.device)
    same = torch.cdist(r.flatten(1), candidates.flatten(1), compute_mode="donot_use_mm_for_euclid_dist") == 0
    same[own, own] = False  # the row's own reference stays: it is the target
    logits = (pz @ cz.T / temp).masked_fill(same, float("-inf"))
    return mse + weight * F.cross_entropy(logits, own)


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float,
             positive: torch.Tensor, label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BLIP-2's image-text contrastive loss, negatives gathered from every rank.

    image_feat (B, Q, E) and text_feat (B, E) are L2-normalised; the image-text similarity is
    the max over the Q query outputs. positive (B, N) marks which gathered rows count as a match
    for each local row: the pair itself, and (unlike BLIP-2, which assumes distinct captions)
    other captions of the same image and identical captions of other images, so duplicates are
    not pushed apart; the target is uniform over the positives. Returns the loss (mean of both
    directions) and the logits i2t (B, N), t2i (B, N) that ITM's hard negatives are drawn from.
    """
    if not torch.is_tensor(temp):
        temp = torch.tensor(temp, device=text_feat.device)
    temp = temp.clamp(TEMP_MIN, TEMP_MAX)
    b, q, e = image_feat.shape
    image_all, _ = _gather_with_grad(image_feat.reshape(b, q * e))  # (N, Q*E)
    text_all, _ = _gather_with_grad(text_feat)  # (N, E)
    image_all = image_all.reshape(-1, q, e)
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feat, text_all).amax(-1) / temp  # (B, N)
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_all).amax(-1) / temp  # (B, N)
    targets = positive.float() / positive.float().sum(1, keepdim=True)  # (B, N)
    loss = (F.cross_entropy(_at_least_fp32(sim_i2t), targets, label_smoothing=label_smoothing)
            + F.cross_entropy(_at_least_fp32(sim_t2i), targets, label_smoothing=label_smoothing)) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def itm_negatives(sim: torch.Tensor, positive: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per row: index j drawn with probability softmax(sim[i]) over the
    non-positive candidates (BLIP-2's ITM sampling). sim, positive (B, N); uniform (B,) in [0, 1)
    picks the draw by inverse CDF, so the caller's seeded numbers fix it on every rank.

    Returns (index (B,), found (B,) bool): a row whose every candidate is a positive has no
    negative (found False, index 0) and must be left out of ITM.
    """
    weights = torch.softmax(sim.float(), dim=1).masked_fill(positive, 0.0)  # (B, N)
    starved = weights.sum(1) <= 0  # every negative underflowed: fall back to a uniform draw
    weights = torch.where(starved[:, None], (~positive).float(), weights)
    cdf = weights.cumsum(1)  # (B, N)
    total = cdf[:, -1]  # (B,)
    found = total > 0
    target = (uniform.to(cdf.device, cdf.dtype) * total)[:, None]  # (B, 1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=sim.shape[1] - 1)
    return index.masked_fill(~found, 0), found


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ITM head's (n, 2) logits; labels 1 for matched pairs, 0 for negatives."""
    return F.cross_entropy(_at_least_fp32(logits), labels)


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             label_smoothing: float = 0.1) -> torch.Tensor:
    """BLIP-2's image-grounded text generation loss: position t of the text (B, L, V) predicts
    token t+1; the first token ([DEC]) is never a target, padding carries no loss; label
    smoothing 0.1 as the reference code's BertLMHeadModel. Mean over target tokens."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)  # (B, L-1)
    return F.cross_entropy(_at_least_fp32(logits[:, :-1]).flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
