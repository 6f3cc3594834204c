"""How close soft prompts sit to the LLM's real token embeddings (library of `blitext check-prompts`).

P-Former prompts are trained to work as the frozen LLM's input embeddings but need not be
any token's embedding. This measures, for every prompt vector, the L2 distance to its
nearest row of the LLM's input-embedding matrix (mean, percentiles, fraction within a
threshold), the two scales side by side (embedding and prompt RMS), and for a few examples
the k nearest tokens of each slot, decoded; and how much the prompts differ between examples
(a P-Former whose prompts hardly differ gives the adaptor alignment targets that carry little
of the caption: the demos' small P-Formers measure 0.24, so 94% of their energy is the mean
prompt). Prompt sources (a P-Former, a prompt cache, an adaptor) and the typer command live
elsewhere; this module takes plain arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from blitext.errors import BlitextError
from blitext.pformer.nearest import as_float32_matrix, nearest_rows

PERCENTILES = (5, 25, 50, 75, 95)
THRESHOLD_SAMPLE = 1024  # embedding rows whose nearest-neighbour distance sets the default threshold
DEFAULT_THRESHOLD_RULE = "median distance between an embedding row and its nearest other row"
LOW_SPREAD = 0.05  # below this the report flags the prompts as nearly constant


@dataclass
class PromptReport:
    n_vectors: int                    # prompt vectors checked: examples x slots
    mean_distance: float              # mean L2 distance (not squared) to the nearest token embedding
    percentiles: dict[str, float]     # "p5" .. "p95" of that distance
    threshold: float                  # L2 distance counted as "at a token"
    fraction_within: float            # share of prompt vectors with nearest distance <= threshold
    embedding_rms: float              # RMS of the embedding matrix's entries, for scale (SmolLM2: 0.136)
    prompt_rms: float                 # RMS of the prompt vectors' entries
    examples: list[dict]              # {"id", "slots": [[k token strings] per slot], "distances": [[k L2] per slot]}
    threshold_rule: str = "given"     # where `threshold` came from
    n_prompt: int | None = None       # soft prompts per example
    k: int = 1                        # neighbours listed per slot in `examples`
    spread: float | None = None       # RMS of (prompt - mean prompt over examples) / prompt RMS; None for 1 example


def token_text(tokenizer, token_id: int) -> str:
    """One token, readable in a log: its decoded text quoted and escaped (' red', '\\n').

    Falls back to the raw vocabulary entry where decoding one id alone gives nothing or a
    broken byte sequence (a byte-level piece of a multi-byte character), and to "#id"
    without a tokenizer.
    """
    if tokenizer is None:
        return f"#{token_id}"
    text = None
    if hasattr(tokenizer, "decode"):
        text = tokenizer.decode([token_id])
    if (not text or "\ufffd" in text) and hasattr(tokenizer, "convert_ids_to_tokens"):
        text = tokenizer.convert_ids_to_tokens(token_id) or text
    return repr(text if text is not None else f"#{token_id}")


def default_threshold(embedding, backend: str = "auto", sample: int = THRESHOLD_SAMPLE, seed: int = 0) -> float:
    """The median L2 distance from an embedding row to its nearest *other* row (a sample of rows).

    Why this rule: a prompt vector nearer to some token than real tokens typically are to
    their own nearest neighbour sits at token spacing, i.e. it could pass for a token; one
    farther away lies off the token cloud. It is scale-free (SmolLM2's embedding RMS is 0.136,
    OPT's differs), needs no labels, and the median ignores the few duplicated or untrained
    rows (padding tokens) that sit at distance ~0 from each other. A sample of 1,024 rows
    pins the median down well and costs one small search.
    """
    emb = as_float32_matrix(embedding, "embedding")
    v = emb.shape[0]
    if v < 2:
        raise BlitextError(f"embedding {tuple(emb.shape)} has fewer than 2 rows, so no default threshold; "
                           "pass threshold=...")
    rows = np.random.default_rng(seed).choice(v, size=min(sample, v), replace=False)
    _, idx = nearest_rows(emb[torch.from_numpy(rows).to(emb.device)], emb, k=2, metric="l2", backend=backend)
    # the row itself is normally first; with exact duplicates another row may come first at distance 0
    other = np.where(idx[:, 0] == rows, idx[:, 1], idx[:, 0])
    dist = _l2(emb[torch.from_numpy(rows).to(emb.device)], emb[torch.from_numpy(other).to(emb.device)])
    return float(np.median(dist))


def _l2(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise L2 distance computed directly (no ||a||^2 - 2ab + ||b||^2 cancellation)."""
    return torch.linalg.vector_norm(a - b, dim=-1).cpu().numpy()


def _neighbour_distances(q: torch.Tensor, emb: torch.Tensor, idx: np.ndarray, block: int = 4096) -> np.ndarray:
    """Exact L2 distance from each q row (M, D) to its listed neighbours emb[idx] (M, k), in blocks."""
    idx_t = torch.from_numpy(idx).to(emb.device)
    return np.concatenate([_l2(q[s:s + block, None, :], emb[idx_t[s:s + block]])   # (b, k)
                           for s in range(0, q.shape[0], block)])


def _rms(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t) / max(t.numel(), 1) ** 0.5)


def between_example_spread(q: torch.Tensor) -> float | None:
    """How much of the prompts' scale varies between examples (N, P, D): 0 = one prompt for every
    example, about 1 = independent prompts of equal scale."""
    if q.shape[0] < 2:
        return None
    return _rms(q - q.mean(dim=0, keepdim=True)) / max(_rms(q), 1e-12)


def check_prompts(prompts, embedding, tokenizer=None, ids=None, threshold: float | None = None, k: int = 3,
                  n_examples: int = 3, backend: str = "auto") -> PromptReport:
    """Distances from each prompt vector (N, P, D) to its nearest row of `embedding` (V, D).

    `ids` names the N examples in the report (default 0..N-1); the first `n_examples` get
    their k nearest tokens per slot decoded with `tokenizer`. `threshold` defaults to
    default_threshold(embedding).
    """
    shape = tuple(prompts.shape) if hasattr(prompts, "shape") else np.shape(prompts)
    if len(shape) != 3:
        raise BlitextError(f"prompts must be (examples, slots, dim), got shape {shape}; "
                           "for a single example add a leading axis (prompts[None])")
    n, p, d = shape
    emb = as_float32_matrix(embedding, "embedding")
    if d != emb.shape[1]:
        raise BlitextError(f"prompts {shape} are {d} wide but the embedding {tuple(emb.shape)} is {emb.shape[1]} wide; "
                           "check the prompts against the LLM they were made for")
    if n * p == 0:
        raise BlitextError(f"prompts {shape} hold no vectors to check")
    if ids is not None and len(ids) != n:
        raise BlitextError(f"got {len(ids)} ids for {n} examples of prompts {shape}")
    if k < 1 or n_examples < 0:
        raise BlitextError(f"k={k} must be >= 1 and n_examples={n_examples} >= 0")
    if threshold is not None and not threshold > 0:
        raise BlitextError(f"threshold={threshold} must be a positive L2 distance")
    k = min(k, emb.shape[0])
    if not isinstance(prompts, torch.Tensor):
        prompts = np.asarray(prompts)
    q = as_float32_matrix(prompts.reshape(n * p, d), "prompts").to(emb.device)  # (N*P, D)

    _, idx = nearest_rows(q, emb, k=k, metric="l2", backend=backend)        # (N*P, k)
    dist = _neighbour_distances(q, emb, idx)                                # (N*P, k), exact L2
    order = np.argsort(dist, axis=1, kind="stable")  # exact distances may swap near-ties of the search
    dist, idx = np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)
    nearest = dist[:, 0]
    if threshold is None:
        threshold, rule = default_threshold(emb, backend=backend), DEFAULT_THRESHOLD_RULE
    else:
        rule = "given"

    ids = list(range(n)) if ids is None else list(ids)
    examples = []
    for e in range(min(n_examples, n)):
        rows = slice(e * p, (e + 1) * p)
        examples.append({"id": ids[e],
                         "slots": [[token_text(tokenizer, int(t)) for t in slot] for slot in idx[rows]],
                         "distances": [[round(float(x), 6) for x in slot] for slot in dist[rows]]})
    return PromptReport(
        n_vectors=n * p, mean_distance=float(nearest.mean()),
        percentiles={f"p{x}": float(v) for x, v in zip(PERCENTILES, np.percentile(nearest, PERCENTILES))},
        threshold=float(threshold), fraction_within=float((nearest <= threshold).mean()),
        embedding_rms=_rms(emb), prompt_rms=_rms(q), examples=examples,
        threshold_rule=rule, n_prompt=p, k=k, spread=between_example_spread(q.view(n, p, d)))


def format_report(report: PromptReport) -> str:
    """Plain text for logs (the CLI renders the same fields with rich)."""
    slots = f" ({report.n_vectors // report.n_prompt} examples x {report.n_prompt} slots)" if report.n_prompt else ""
    pct = "  ".join(f"{name} {v:.4g}" for name, v in report.percentiles.items())
    lines = [
        f"prompt vectors: {report.n_vectors}{slots}",
        f"L2 distance to the nearest token embedding: mean {report.mean_distance:.4g}  {pct}",
        f"within {report.threshold:.4g} ({report.threshold_rule}): {100 * report.fraction_within:.1f}%",
        f"scale: embedding RMS {report.embedding_rms:.4g}, prompt RMS {report.prompt_rms:.4g}",
    ]
    if report.spread is not None:
        lines.append(f"between-example spread: {report.spread:.3g} of the prompt RMS"
                     + (" (nearly one prompt for every example)" if report.spread < LOW_SPREAD else ""))
    for ex in report.examples:
        lines.append(f"example {ex['id']}: nearest {report.k} tokens per slot (L2 distance)")
        for s, (toks, dists) in enumerate(zip(ex["slots"], ex["distances"])):
            lines.append(f"  slot {s:2d}: " + "  ".join(f"{t} ({x:.3g})" for t, x in zip(toks, dists)))
    return "\n".join(lines)
