"""mAP and CMC against two independent references: a brute-force float64 loop written here, and torchreid's
`evaluate_rank` (the dev extra installs torchreid; only its rank module is loaded, by file path, since the
package's own import pulls in scipy and more: benchmarks/bench_reid_eval.py)."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from benchmarks.bench_reid_eval import main as bench_main
from benchmarks.bench_reid_eval import torchreid_rank_module
from dhm_fast.reid_metrics import rank_metrics

RANKS = (1, 5, 10)


def retrieval_set(seed: int, nq: int = 40, ng: int = 300, dim: int = 4) -> tuple[torch.Tensor, ...]:
    """Embeddings of small integers (many exactly tied distances), ids and cameras, with one query whose
    identity is absent from the gallery and one whose identity the gallery shows only in its own camera."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randint(-1, 2, (nq, dim), generator=g).double()
    gallery = torch.randint(-1, 2, (ng, dim), generator=g).double()
    q_ids, g_ids = torch.randint(0, 10, (nq,), generator=g), torch.randint(0, 10, (ng,), generator=g)
    q_cams, g_cams = torch.randint(1, 4, (nq,), generator=g), torch.randint(1, 4, (ng,), generator=g)
    q_ids[0] = 99  # nowhere in the gallery
    q_ids[1], q_cams[1] = 50, 2
    g_ids[:3], g_cams[:3] = 50, 2  # identity 50 only in query 1's camera
    return query, gallery, q_ids, g_ids, q_cams, g_cams


def brute_force(query, gallery, q_ids, g_ids, q_cams, g_cams) -> dict:
    """One query at a time in float64 with plain differences; ties in gallery order."""
    q, g = query.double(), gallery.double()
    aps, firsts = [], []
    for i in range(len(q)):
        dist = ((g - q[i]) ** 2).sum(1).tolist()
        order = sorted(range(len(g)), key=lambda j: (dist[j], j))
        ranked = [j for j in order if not (g_ids[j] == q_ids[i] and g_cams[j] == q_cams[i])]
        hits = [r for r, j in enumerate(ranked, 1) if g_ids[j] == q_ids[i]]
        if hits:
            aps.append(sum((n + 1) / r for n, r in enumerate(hits)) / len(hits))
            firsts.append(hits[0])
    out = {"mAP": 100 * float(np.mean(aps))}
    out.update({f"rank{k}": 100 * float(np.mean([f <= k for f in firsts])) for k in RANKS})
    return {**out, "valid_queries": len(aps), "queries": len(q)}


def assert_same(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], rel=1e-6), key  # float32 precision terms


def test_average_precision_by_hand():
    # Ranked gallery: match (rank 1), other id, same id + same camera (removed), other id, match (rank 4).
    query = torch.zeros(1, 1)
    gallery = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    out = rank_metrics(query, gallery, torch.tensor([7]), torch.tensor([7, 1, 7, 2, 7]), torch.tensor([1]),
                       torch.tensor([2, 2, 1, 2, 3]))
    assert out["mAP"] == pytest.approx(100 * (1 / 1 + 2 / 4) / 2)
    assert (out["rank1"], out["rank5"], out["valid_queries"]) == (100.0, 100.0, 1)


@pytest.mark.parametrize(("dtype", "scale"), [
    (torch.float64, 1.0), (torch.float64, 2.0**300), (torch.float32, 1.0), (torch.float32, 2.0**70),
    (torch.float32, 2.0**-100), (torch.float16, 2.0**10), (torch.float16, 2.0**-10), (torch.bfloat16, 2.0**70),
])
@pytest.mark.parametrize("block_bytes", [64 * 300 * 7, 2**28])  # 7 queries per block, or all at once
def test_matches_brute_force_with_ties_extremes_and_every_dtype(dtype, scale, block_bytes):
    query, gallery, *labels = retrieval_set(seed=0)
    query, gallery = (query * scale).to(dtype), (gallery * scale).to(dtype)  # powers of two: still exact
    ours = rank_metrics(query, gallery, *labels, block_bytes=block_bytes)
    assert_same(ours, brute_force(query, gallery, *labels))
    assert ours["valid_queries"] <= len(query) - 2  # the two queries without a valid match are skipped


def test_matches_brute_force_on_gaussian_embeddings():
    g = torch.Generator().manual_seed(1)
    query, gallery = torch.randn(30, 16, generator=g), torch.randn(200, 16, generator=g)
    labels = (torch.randint(0, 8, (30,), generator=g), torch.randint(0, 8, (200,), generator=g),
              torch.randint(0, 6, (30,), generator=g), torch.randint(0, 6, (200,), generator=g))
    assert_same(rank_metrics(query, gallery, *labels), brute_force(query, gallery, *labels))


def torchreid_evaluate_rank():
    if importlib.util.find_spec("torchreid") is None:
        pytest.skip("torchreid is not installed (pip install torchreid==0.2.5; the dev extra has it)")
    return torchreid_rank_module().evaluate_rank


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchreid_evaluate_rank(seed):
    evaluate_rank = torchreid_evaluate_rank()
    query, gallery, q_ids, g_ids, q_cams, g_cams = retrieval_set(seed)
    dist = ((query[:, None] - gallery[None]) ** 2).sum(-1).numpy()  # exact integers
    # numpy's argsort leaves the order of ties unspecified; ours is gallery order. Integer distances differ
    # by at least 1, so adding j / (2 * gallery size) to column j orders ties that way and nothing else.
    dist = dist + np.arange(len(gallery)) / (2 * len(gallery))
    cmc, m_ap = evaluate_rank(dist, q_ids.numpy(), g_ids.numpy(), q_cams.numpy(), g_cams.numpy(), max_rank=10,
                              use_cython=False)
    ours = rank_metrics(query.float(), gallery.float(), q_ids, g_ids, q_cams, g_cams)
    assert ours["mAP"] == pytest.approx(100 * m_ap, rel=1e-6)
    for k in RANKS:
        assert ours[f"rank{k}"] == pytest.approx(100 * cmc[k - 1], rel=1e-6)


def test_bad_inputs_are_one_line_errors():
    query, gallery, q_ids, g_ids, q_cams, g_cams = retrieval_set(seed=0)
    with pytest.raises(ValueError, match="no query has a true match"):
        rank_metrics(query, gallery, q_ids + 1000, g_ids, q_cams, g_cams)
    with pytest.raises(ValueError, match="NaN or infinite"):
        rank_metrics(query.clone().fill_(float("nan")), gallery, q_ids, g_ids, q_cams, g_cams)
    with pytest.raises(ValueError, match="one d"):
        rank_metrics(query[:, :2], gallery, q_ids, g_ids, q_cams, g_cams)
    with pytest.raises(ValueError, match="gallery_cams must have shape"):
        rank_metrics(query, gallery, q_ids, g_ids, q_cams, g_cams[:-1])


def test_the_benchmark_agrees_with_torchreid_and_writes_its_figures(tmp_path):
    torchreid_evaluate_rank()  # skips without torchreid
    out = tmp_path / "reid_eval.json"
    assert bench_main(["--queries", "20", "--gallery", "120", "--dim", "8", "--identities", "10", "--repeats", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metrics_agree"] and report["settings"]["gallery"] == 120 and report["seconds"]["ours"]["n"] == 1
