"""Person re-ID retrieval metrics: mAP and CMC ranks, single-query standard protocol (Market-1501).

For each query the gallery is ranked by squared euclidean distance of the embeddings (ties in gallery
order, as a stable sort leaves them); gallery images of the query's identity seen by the query's camera
are removed from its list. AP is the mean of the precision at each true match (not interpolated), CMC
rank-k is 1 when the first true match is within the top k. A query with no true match left is skipped
and the means run over the others, as torchreid's `evaluate_rank` does. Junk images (Market's -1) never
reach this function: pipelines/reid.py leaves them out, which is how the dataset defines them.

Everything runs on the embeddings' device, a block of queries at a time, so the [queries, gallery]
distance and ranking matrices never exist whole: Market's 3,368 x 15,913 needs `block_bytes` at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

RANKS = (1, 5, 10)
BLOCK_BYTES = 256 * 2**20  # working memory of one block of queries
BYTES_PER_ENTRY = 96  # per (query, gallery) entry, measured: distance, sort, gathered ids, masks, counts


def scaled(query: Tensor, gallery: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets in float64 (float64 input) or float32; when their largest magnitude is far from 1, divided by
    the power of two that brings it into [0.5, 1): exact, so ties survive, and squares neither overflow nor
    underflow."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    query, gallery = query.to(dtype), gallery.to(query.device, dtype)
    if not (torch.isfinite(query).all() and torch.isfinite(gallery).all()):
        raise ValueError("embeddings hold NaN or infinite values (did training diverge?)")
    exponent = int(torch.frexp(torch.maximum(query.abs().max(), gallery.abs().max())).exponent)
    if abs(exponent) <= 16:  # squares of d values this size are safe: no copies of the embeddings
        return query, gallery
    power = torch.tensor(-exponent, device=query.device)
    return torch.ldexp(query, power), torch.ldexp(gallery, power)


def rank_metrics(query: Tensor, gallery: Tensor, query_ids: Tensor, gallery_ids: Tensor, query_cams: Tensor,
                 gallery_cams: Tensor, ranks: tuple[int, ...] = RANKS, block_bytes: int = BLOCK_BYTES) -> dict:
    """{"mAP", "rank1", ...: percent, "valid_queries": n, "queries": n} of query/gallery embeddings [n, d]."""
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1] or not (len(query) and len(gallery)):
        raise ValueError(f"embeddings must be non-empty [n, d] with one d, got {tuple(query.shape)} and "
                         f"{tuple(gallery.shape)}")
    for name, t, n in (("query_ids", query_ids, len(query)), ("query_cams", query_cams, len(query)),
                       ("gallery_ids", gallery_ids, len(gallery)), ("gallery_cams", gallery_cams, len(gallery))):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    device = query.device
    query, gallery = scaled(query, gallery)
    g_ids, g_cams = gallery_ids.to(device, torch.int32), gallery_cams.to(device, torch.int32)
    g_squares = gallery.square().sum(1)
    block = max(1, block_bytes // (BYTES_PER_ENTRY * len(gallery)))
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits_at = torch.zeros(len(ranks), dtype=torch.long, device=device)
    valid = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(query), block):
        sl = slice(start, start + block)
        q = query[sl]
        distances = (q.square().sum(1, keepdim=True) + g_squares).addmm_(q, gallery.T, alpha=-2)  # squared
        order = torch.argsort(distances, dim=1, stable=True)
        del distances
        q_ids = query_ids[sl].to(device, torch.int32)[:, None]
        q_cams = query_cams[sl].to(device, torch.int32)[:, None]
        same_id = g_ids[order] == q_ids
        kept = ~(same_id & (g_cams[order] == q_cams))  # same identity, same camera: not a valid match
        hit = same_id & kept
        position = kept.cumsum(1, dtype=torch.int32)  # 1-based rank of each kept entry
        found = hit.cumsum(1, dtype=torch.int32)
        relevant = found[:, -1]
        precision = torch.where(hit, found / position, 0.0).sum(1, dtype=torch.float64)  # 0 without a match
        ap_sum += (precision / relevant.clamp(min=1)).sum()
        first = torch.where(hit, position, torch.iinfo(torch.int32).max).amin(1)
        hits_at += torch.stack([(first <= k).sum() for k in ranks])
        valid += (relevant > 0).sum()
    n_valid = int(valid.item())
    if n_valid == 0:
        raise ValueError("no query has a true match in the gallery (other than from its own camera)")
    result = {"mAP": 100.0 * ap_sum.item() / n_valid}
    result.update({f"rank{k}": 100.0 * h / n_valid for k, h in zip(ranks, hits_at.tolist(), strict=True)})
    return {**result, "valid_queries": n_valid, "queries": len(query)}
