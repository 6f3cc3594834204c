"""Exact nearest rows of a matrix (e.g. an LLM's token-embedding table) for a batch of queries.

Two exact backends that return the same neighbours (tests/test_nearest.py checks it):
  - "faiss": IndexFlatL2 / IndexFlatIP from faiss-cpu, built per call.
  - "torch": chunked matmul, ||q||^2 - 2 q.m + ||m||^2 (or q.m), top-k per chunk merged
    into a running top-k, so memory stays bounded whatever the vocabulary size. It runs on
    the matrix's device, so a CUDA embedding table is searched on the GPU.
"auto" picks one by choose_backend(), whose rule comes from bench/nearest.py's timings.

Metrics follow FAISS: "l2" returns squared L2 distances (smaller is nearer), "ip" inner
products (larger is nearer). Results are sorted, nearest first.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from blitext.errors import BlitextError

METRICS = ("l2", "ip")
BACKENDS = ("auto", "faiss", "torch")
CHUNK_ELEMENTS = 1 << 24  # one (queries x vocabulary chunk) score block: 16M floats = 64 MiB
QUERY_BLOCK = 8192        # queries searched together; bounds the block when queries are many


def choose_backend(n_queries: int, n_rows: int, dim: int) -> str:
    """The faster exact backend on a CPU for this search size: torch at every measured size.

    Measured by bench/nearest.py (bench/results/nearest.json) on the 2-core dev machine, k=1,
    l2, seconds per call including FAISS's per-call index build, the two backends interleaved,
    best of up to 3 (1-2 for the largest cells), with other jobs at times sharing the CPUs
    (load average 2.5-3 during this run, 3-5 during earlier ones):

        vocabulary          queries:    32           256          2048          8192
                                     faiss torch  faiss torch  faiss torch  faiss torch
        SmolLM2 49,152 x 576         0.49  0.12   0.63  0.27   1.84  1.76  10.70  7.64
        OPT-2.7B 50,272 x 2560       3.27  0.52   2.07  0.99   4.00  2.68  16.56 15.99
        BERT 30,522 x 768            0.22  0.03   0.21  0.14   0.93  0.65   3.21  3.58

    Up to 256 queries torch is 1.5-9x faster: FAISS copies the whole matrix into its index
    on every call and searches it in 1,024-row BLAS blocks. From 2,048 queries both are one
    big sgemm and tie: faiss/torch ranged 0.76-1.76 over this run and one under load 4
    (except 0.58 on SmolLM2 x 2048 there, which re-measured at 0.93-1.07). No size had
    FAISS reliably faster, so: torch, which also copies nothing, bounds its memory and runs on
    a GPU. FAISS stays as the cross-check (backend="faiss"). The arguments stay so a rule
    measured on another machine can use them.
    """
    del n_queries, n_rows, dim
    return "torch"


def as_float32_matrix(x, name: str) -> torch.Tensor:
    """A float32, contiguous, 2-D tensor sharing memory with `x` where it can (no grad)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        a = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
        with warnings.catch_warnings():  # read-only arrays (memmaps, h5py reads) are only read here
            warnings.filterwarnings("ignore", message=".*not writable.*")
            t = torch.from_numpy(a)
    if t.is_complex() or t.dtype == torch.bool:
        raise BlitextError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.ndim != 2:
        raise BlitextError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}; "
                           "reshape it, e.g. prompts.reshape(-1, dim)")
    return t.to(torch.float32).contiguous()


def _faiss_search(q: torch.Tensor, m: torch.Tensor, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    qn = q.cpu().numpy()  # float32 C-contiguous views, as FAISS requires
    mn = m.cpu().numpy()
    index = faiss.IndexFlatL2(mn.shape[1]) if metric == "l2" else faiss.IndexFlatIP(mn.shape[1])
    index.add(mn)
    distances, indices = index.search(qn, k)
    return distances, indices.astype(np.int64)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row; vector_norm makes no (rows, D) temporary, unlike (x * x).sum(1),
    which took 0.48 s instead of 0.06 s on OPT-2.7B's 50,272 x 2560 table here."""
    return torch.linalg.vector_norm(x, dim=1).square()


def _torch_search(q: torch.Tensor, m: torch.Tensor, k: int, metric: str,
                  chunk_rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    q = q.to(m.device)
    n, v = q.shape[0], m.shape[0]
    block = min(n, QUERY_BLOCK)
    chunk = chunk_rows or max(k, CHUNK_ELEMENTS // max(block, 1))
    largest = metric == "ip"
    out_d = torch.empty(n, k, dtype=torch.float32, device=m.device)
    out_i = torch.empty(n, k, dtype=torch.int64, device=m.device)
    with torch.no_grad():
        for qs in range(0, n, block):
            qb = q[qs:qs + block]                                        # (B, D)
            best_d = best_i = None
            for ms in range(0, v, chunk):
                mc = m[ms:ms + chunk]                                    # (C, D)
                if metric == "l2":
                    # ||m||^2 - 2 q.m; ||q||^2 is constant per query, so it is added after top-k
                    scores = torch.addmm(_sq_norms(mc)[None, :], qb, mc.T, alpha=-2.0)  # (B, C)
                else:
                    scores = qb @ mc.T                                   # (B, C)
                if k == 1:  # min/max measured ~10% cheaper than topk; selection is a real share at small D
                    d, i = scores.max(1, keepdim=True) if largest else scores.min(1, keepdim=True)  # (B, 1)
                else:
                    d, i = scores.topk(min(k, mc.shape[0]), dim=1, largest=largest)  # (B, <=k)
                i += ms
                if best_d is not None:  # merge with the running top-k of earlier chunks
                    d, j = torch.cat([best_d, d], 1).topk(min(k, best_d.shape[1] + d.shape[1]), dim=1,
                                                          largest=largest)
                    i = torch.cat([best_i, i], 1).gather(1, j)
                best_d, best_i = d, i
            if metric == "l2":
                # clamp as FAISS does: rounding can make a tiny squared distance negative
                best_d = (best_d + _sq_norms(qb)[:, None]).clamp_min_(0.0)
            out_d[qs:qs + block], out_i[qs:qs + block] = best_d, best_i
    return out_d.cpu().numpy(), out_i.cpu().numpy()


def nearest_rows(queries, matrix, k: int = 1, metric: str = "l2", backend: str = "auto",
                 *, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of `matrix` (V, D) to each of `queries` (N, D), exactly.

    Accepts torch tensors or numpy arrays of any real dtype (computed in float32). Returns
    (distances (N, k) float32, indices (N, k) int64) as numpy, nearest first: squared L2
    distances for metric "l2", inner products for "ip". `chunk_rows` fixes how many matrix
    rows the torch backend scores at once (default: a 64 MiB score block).
    """
    if metric not in METRICS:
        raise BlitextError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if backend not in BACKENDS:
        raise BlitextError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    q = as_float32_matrix(queries, "queries")
    m = as_float32_matrix(matrix, "matrix")
    if q.shape[1] != m.shape[1]:
        raise BlitextError(f"queries {tuple(q.shape)} and matrix {tuple(m.shape)} differ in width "
                           f"({q.shape[1]} vs {m.shape[1]}); were the prompts made for this LLM?")
    if m.shape[0] == 0:
        raise BlitextError(f"matrix {tuple(m.shape)} has no rows to search")
    if not 1 <= k <= m.shape[0]:
        raise BlitextError(f"k={k} must be between 1 and the matrix's {m.shape[0]} rows")
    if chunk_rows is not None and chunk_rows < 1:
        raise BlitextError(f"chunk_rows={chunk_rows} must be at least 1")
    if not torch.isfinite(q).all():
        bad = int((~torch.isfinite(q)).any(1).sum())
        raise BlitextError(f"{bad} of {q.shape[0]} query rows hold NaN or inf; the model that made them diverged")
    if q.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    if backend == "auto":
        backend = "torch" if m.is_cuda else choose_backend(q.shape[0], m.shape[0], m.shape[1])
    if backend == "faiss":
        return _faiss_search(q, m, k, metric)
    return _torch_search(q, m, k, metric, chunk_rows)
