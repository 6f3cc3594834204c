"""Image-text retrieval recall as BLIP-2 evaluates it (docs/method.md#retrieval-recall), kept model-agnostic.

BLIP-2 scores all pairs with ITC similarity, then re-scores each query's top k=128 candidates
with ITM + ITC and ranks by that. The caller owns the model: it passes the ITC matrix and a
function that scores (query, candidate) pairs; rerank_top_k returns a matrix in which the top k
are ordered by that function and everything else keeps its ITC order below them.

    i2t = rerank_top_k(itc, lambda q, c: itm(images[q], texts[c]) + itc[q[:, None], c])
    t2i = rerank_top_k(itc.T, lambda q, c: itm(images[c], texts[q]) + itc.T[q[:, None], c])
    retrieval_recall(i2t, text_to_image, sim_t2i=t2i.T)

Ties are ranked by index (stable sort), so a constant score matrix does not look perfect.
"""
from __future__ import annotations

from numbers import Integral
from typing import Callable, Sequence

import torch

from blitext.errors import BlitextError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def retrieval_recall(sim: torch.Tensor, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                     sim_t2i: torch.Tensor | None = None) -> dict[str, float]:
    """R@k in percent in both directions and their means, under LAVIS's key names.

    sim: (n_images, n_texts) scores; text_to_image[j] is the image text j describes. An image's
    rank is the best rank of any of its captions (image->text, "txt_r{k}"); a text's rank is that
    of its one image (text->image, "img_r{k}"). sim_t2i, same shape, when the text->image
    direction was re-ranked separately (it then replaces sim for that direction)."""
    n_images, _ = _check_retrieval(sim, text_to_image, sim_t2i)
    ks = _check_ks(ks)
    owner = torch.as_tensor(list(text_to_image), dtype=torch.long)                        # (n_texts,)
    sim = sim.float().cpu()
    t2i = sim if sim_t2i is None else sim_t2i.float().cpu()
    i2t_ranks = _best_ranks(sim, owner[None, :] == torch.arange(n_images)[:, None])          # (n_images,)
    t2i_ranks = _best_ranks(t2i.T, torch.arange(n_images)[None, :] == owner[:, None])        # (n_texts,)
    out: dict[str, float] = {}
    for name, ranks in (("txt", i2t_ranks), ("img", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100 * int((ranks < k).sum()) / len(ranks)  # Python floats: 2/3 -> 66.666...67
        out[f"{name}_r_mean"] = sum(out[f"{name}_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """No k would divide the mean by zero; k < 1 would report a meaningless 0."""
    ks = tuple(ks)
    if not ks or not all(isinstance(k, Integral) and k >= 1 for k in ks):
        raise BlitextError(f"ks must name at least one k of R@k, each a whole number >= 1, got {ks!r}: "
                           f"e.g. ks=(1, 5, 10)")
    return ks


def _best_ranks(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per row, the 0-based position of the first correct column once the row is sorted best-first."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices                  # (rows, cols)
    hits = torch.gather(correct, 1, order)                                                   # (rows, cols)
    return hits.float().argmax(dim=1)                                                        # first True


def _check_retrieval(sim: torch.Tensor, text_to_image: Sequence[int], sim_t2i: torch.Tensor | None) -> tuple[int, int]:
    """Shapes and the caption->image map must agree; every image needs a caption to be ranked."""
    if sim.dim() != 2:
        raise BlitextError(f"sim must be (n_images, n_texts), got shape {tuple(sim.shape)}")
    n_images, n_texts = sim.shape
    if sim_t2i is not None and sim_t2i.shape != sim.shape:
        raise BlitextError(f"sim_t2i has shape {tuple(sim_t2i.shape)}, sim has {tuple(sim.shape)}: pass both "
                           f"as (n_images, n_texts) (transpose a text-major re-ranked matrix)")
    if len(text_to_image) != n_texts:
        raise BlitextError(f"text_to_image has {len(text_to_image)} entries for {n_texts} texts: give each "
                           f"text (each column of sim) the index of its image")
    bad = [i for i in text_to_image if not 0 <= i < n_images]
    if bad:
        raise BlitextError(f"text_to_image names image {bad[0]} but sim has {n_images} images (rows)")
    captionless = sorted(set(range(n_images)) - set(text_to_image))
    if captionless:
        raise BlitextError(f"image {captionless[0]} has no caption in text_to_image ({len(captionless)} such "
                           f"images): drop them from sim or add their captions")
    _refuse_nan(sim, "sim")
    if sim_t2i is not None:
        _refuse_nan(sim_t2i, "sim_t2i")
    return n_images, n_texts


def _refuse_nan(scores: torch.Tensor, name: str) -> None:
    """A descending sort puts NaN first, so NaN scores would count as hits and inflate R@k."""
    nan = int(torch.isnan(scores).sum()) if scores.is_floating_point() else 0
    if nan:
        raise BlitextError(f"{name} holds {nan} NaN of {scores.numel()} scores: the model produced NaN "
                           f"similarities; find where (e.g. fp16 overflow, a NaN checkpoint) and recompute them")


@torch.no_grad()
def rerank_top_k(itc_sim: torch.Tensor, score_fn: ScoreFn, k: int = 128,
                 queries_per_call: int = 16) -> torch.Tensor:
    """Scores to rank by after BLIP-2's re-ranking: per query (row), its k best ITC candidates get
    score_fn's scores and come first; the rest keep their ITC order after them.

    score_fn(query_indices (q,), candidate_indices (q, k)) -> (q, k) scores (ITM + ITC in BLIP-2),
    called on queries_per_call rows at a time so the caller controls memory. Indices and the
    returned (n_queries, n_candidates) float matrix are on the CPU."""
    if itc_sim.dim() != 2:
        raise BlitextError(f"itc_sim must be (n_queries, n_candidates), got shape {tuple(itc_sim.shape)}")
    if k < 1:
        raise BlitextError(f"k must be at least 1, got {k}")
    sim = itc_sim.float().cpu()
    n_queries, n_candidates = sim.shape
    k = min(k, n_candidates)
    top = sim.topk(k, dim=1).indices                                                          # (n_queries, k)
    rescored = torch.empty(n_queries, k)
    for start in range(0, n_queries, queries_per_call):
        rows = torch.arange(start, min(start + queries_per_call, n_queries))
        scores = torch.as_tensor(score_fn(rows, top[rows])).float().cpu()
        if scores.shape != (len(rows), k):
            raise BlitextError(f"score_fn returned shape {tuple(scores.shape)} for {len(rows)} queries x {k} "
                               f"candidates: return one score per (query, candidate) pair")
        rescored[rows] = scores
    # Everything outside the top k moves below the lowest re-scored value of its row, order kept.
    gap = sim.max(dim=1, keepdim=True).values - rescored.min(dim=1, keepdim=True).values     # (n_queries, 1)
    shift = gap.clamp(min=0) + 1
    out = sim - shift                                                                         # (n_queries, n_candidates)
    out.scatter_(1, top, rescored)
    return out
