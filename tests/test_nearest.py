"""blitext.pformer.nearest: FAISS and torch agree, planted neighbours are found, bad inputs are refused."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from blitext.errors import BlitextError
from blitext.pformer.nearest import choose_backend, nearest_rows


def random_data(n=64, v=1037, d=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((v, d)).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 5])
def test_faiss_and_torch_return_the_same_neighbours(metric, k):
    queries, matrix = random_data()
    f_d, f_i = nearest_rows(queries, matrix, k, metric, "faiss")
    # 1037 rows in chunks of 128: 9 chunks, the last one partial, merged into a running top-k
    t_d, t_i = nearest_rows(torch.from_numpy(queries), torch.from_numpy(matrix), k, metric, "torch", chunk_rows=128)
    assert f_i.shape == t_i.shape == f_d.shape == t_d.shape == (64, k)
    assert f_i.dtype == t_i.dtype == np.int64 and t_d.dtype == np.float32
    np.testing.assert_array_equal(f_i, t_i)
    np.testing.assert_allclose(f_d, t_d, rtol=1e-5, atol=1e-4)
    # nearest first: distances ascend for l2, inner products descend for ip
    step = np.diff(t_d, axis=1)
    assert (step >= 0).all() if metric == "l2" else (step <= 0).all()


def test_chunk_smaller_than_k_and_default_chunking_agree():
    queries, matrix = random_data(n=20, v=300, d=16, seed=1)
    ref = nearest_rows(queries, matrix, 5, "l2", "faiss")
    for chunk in (3, 7, None):
        d, i = nearest_rows(queries, matrix, 5, "l2", "torch", chunk_rows=chunk)
        np.testing.assert_array_equal(i, ref[1])
        np.testing.assert_allclose(d, ref[0], rtol=1e-5, atol=1e-4)


def test_distances_are_what_faiss_defines():
    queries, matrix = random_data(n=8, v=50, d=6, seed=2)
    for backend in ("faiss", "torch"):
        d, i = nearest_rows(queries, matrix, 1, "l2", backend)
        np.testing.assert_allclose(d[:, 0], ((queries - matrix[i[:, 0]]) ** 2).sum(1), rtol=1e-5)  # squared L2
        d, i = nearest_rows(queries, matrix, 1, "ip", backend)
        np.testing.assert_allclose(d[:, 0], (queries * matrix[i[:, 0]]).sum(1), rtol=1e-5)
        np.testing.assert_array_equal(i[:, 0], (queries @ matrix.T).argmax(1))


@pytest.mark.parametrize("backend", ["faiss", "torch", "auto"])
def test_planted_exact_neighbours_are_found(backend):
    rng = np.random.default_rng(3)
    matrix = (0.136 * rng.standard_normal((2000, 64))).astype(np.float64)  # float64 in: computed in float32
    rows = rng.integers(0, 2000, 100)
    queries = matrix[rows] + 1e-4 * rng.standard_normal((100, 64))
    d, i = nearest_rows(queries, matrix, 2, "l2", backend, chunk_rows=256 if backend == "torch" else None)
    np.testing.assert_array_equal(i[:, 0], rows)
    assert (d[:, 0] < 1e-4).all() and (d[:, 0] >= 0).all() and (d[:, 1] > 0.1).all()
    d, i = nearest_rows(matrix[rows], matrix, 1, "l2", backend)  # exact copies: distance 0 (clamped, not negative)
    np.testing.assert_array_equal(i[:, 0], rows)
    np.testing.assert_allclose(d[:, 0], 0, atol=1e-5)


def test_read_only_and_non_contiguous_inputs():
    queries, matrix = random_data(n=10, v=200, d=12, seed=4)
    ro = matrix.copy()
    ro.flags.writeable = False
    ref = nearest_rows(queries, matrix, 3, "l2", "faiss")
    for backend in ("faiss", "torch"):
        np.testing.assert_array_equal(nearest_rows(queries, ro, 3, "l2", backend)[1], ref[1])
        strided = torch.from_numpy(np.asfortranarray(matrix))  # column-major view
        np.testing.assert_array_equal(nearest_rows(torch.from_numpy(queries), strided, 3, "l2", backend)[1], ref[1])
    grad = torch.from_numpy(queries).requires_grad_()
    np.testing.assert_array_equal(nearest_rows(grad, matrix, 3, "l2", "torch")[1], ref[1])


def test_no_queries_gives_empty_results():
    _, matrix = random_data(v=10, d=4)
    d, i = nearest_rows(np.zeros((0, 4), np.float32), matrix, 2)
    assert d.shape == i.shape == (0, 2)


def test_input_errors_quote_the_values():
    queries, matrix = random_data(n=5, v=30, d=8)
    with pytest.raises(BlitextError, match=r"queries \(5, 7\).*matrix \(30, 8\)"):
        nearest_rows(queries[:, :7], matrix)
    with pytest.raises(BlitextError, match=r"k=31 .* 30 rows"):
        nearest_rows(queries, matrix, k=31)
    with pytest.raises(BlitextError, match=r"k=0"):
        nearest_rows(queries, matrix, k=0)
    with pytest.raises(BlitextError, match="unknown metric 'cosine'"):
        nearest_rows(queries, matrix, metric="cosine")
    with pytest.raises(BlitextError, match="unknown backend 'gpu'"):
        nearest_rows(queries, matrix, backend="gpu")
    with pytest.raises(BlitextError, match=r"2-D .* \(8,\)"):
        nearest_rows(queries[0], matrix)
    bad = queries.copy()
    bad[2, 3] = np.nan
    with pytest.raises(BlitextError, match="1 of 5 query rows hold NaN"):
        nearest_rows(bad, matrix)


def test_choose_backend_is_torch_at_every_measured_size():
    # bench/results/nearest.json: no size had FAISS reliably faster on this machine (the docstring's table)
    for n in (1, 32, 256, 2048, 8192, 100_000):
        for v, d in ((49_152, 576), (50_272, 2560), (30_522, 768), (100, 8)):
            assert choose_backend(n, v, d) == "torch", (n, v, d)


@pytest.mark.parametrize("first", ["torch", "faiss"])
def test_torch_and_faiss_in_one_process(first):
    """Importing both has crashed elsewhere (two OpenMP runtimes); a crash here fails the test."""
    other = "faiss" if first == "torch" else "torch"
    script = textwrap.dedent(f"""
        import {first}, {other}
        import numpy as np
        from blitext.pformer.nearest import nearest_rows
        rng = np.random.default_rng(0)
        m = rng.standard_normal((5000, 64)).astype(np.float32)
        q = rng.standard_normal((300, 64)).astype(np.float32)
        a = nearest_rows(q, m, 3, "l2", "faiss")
        b = nearest_rows(q, m, 3, "l2", "torch", chunk_rows=1000)
        c = torch.from_numpy(q) @ torch.from_numpy(m).T   # torch's own OpenMP-threaded matmul after faiss ran
        assert (a[1] == b[1]).all() and (a[1][:, 0] == ((q[:, None] - m[None]) ** 2).sum(-1).argmin(1)).all()
        print("ok", faiss.omp_get_max_threads(), torch.get_num_threads())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    assert run.stdout.startswith("ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matrix_is_searched_with_torch_on_the_device():
    queries, matrix = random_data()
    ref = nearest_rows(queries, matrix, 5, "l2", "faiss")
    d, i = nearest_rows(torch.from_numpy(queries).cuda(), torch.from_numpy(matrix).cuda(), 5, "l2", "auto")
    np.testing.assert_array_equal(i, ref[1])
    np.testing.assert_allclose(d, ref[0], rtol=1e-4, atol=1e-3)
