"""Re-ID evaluation time, ours against torchreid's, on a synthetic Market-1501-sized set (seconds, lower is
better), timed side by side in interleaved rounds.

    python -m benchmarks.bench_reid_eval [--device cuda] [--out FILE.json]

Both start from the query and gallery embeddings: ours is dhm_fast.reid_metrics.rank_metrics (distances and
ranking on --device, a block of queries at a time); torchreid's is what its engine runs, the squared
euclidean distance matrix in torch on the CPU, then `evaluate_rank` in numpy (the PyPI package ships no
compiled Cython ranking, so this is its Python path). Both must give the same mAP and CMC. The figures and
the machine they were measured on: docs/reid.md.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import check, cli, environment, log, option, parse_settings, quantiles, time_round_robin
from dhm_fast.reid_metrics import BLOCK_BYTES, rank_metrics


@dataclass
class ReidEvalBench:
    queries: int = option(3368, "query images (Market-1501: 3,368)", ge=1)
    gallery: int = option(15913, "gallery images (Market-1501 without its junk: 15,913)", ge=1)
    dim: int = option(2048, "embedding size (ResNet-50: 2,048)", ge=1)
    identities: int = option(750, "test identities (Market-1501: 750), plus distractors in the gallery", ge=1)
    repeats: int = option(3, "timed rounds", ge=1)
    device: str = option("cpu", "where ours runs (torchreid's ranking is numpy, on the CPU)")
    out: Path | None = option(None, "also write the results here as JSON")


def synthetic_set(cfg: ReidEvalBench, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Embeddings around one centre per identity (moderate accuracy, as a trained net gives), six cameras;
    one gallery image in six is a distractor (identity 0, never queried)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(cfg.identities + 1, cfg.dim, generator=g)
    q_ids = torch.randint(1, cfg.identities + 1, (cfg.queries,), generator=g)
    g_ids = torch.randint(1, cfg.identities + 1, (cfg.gallery,), generator=g)
    g_ids[torch.rand(cfg.gallery, generator=g) < 1 / 6] = 0
    query = centres[q_ids] + 3 * torch.randn(cfg.queries, cfg.dim, generator=g)
    gallery = centres[g_ids] + 3 * torch.randn(cfg.gallery, cfg.dim, generator=g)
    q_cams, g_cams = torch.randint(1, 7, (cfg.queries,), generator=g), torch.randint(1, 7, (cfg.gallery,), generator=g)
    return query, gallery, q_ids, g_ids, q_cams, g_cams


def torchreid_rank_module():
    """torchreid's rank.py, loaded alone (the package's own import pulls in scipy and more)."""
    spec = importlib.util.find_spec("torchreid")
    if spec is None or spec.origin is None:
        raise ValueError("torchreid is not installed: pip install torchreid==0.2.5 (the dev extra has it)")
    path = Path(spec.origin).parent / "reid" / "metrics" / "rank.py"
    module_spec = importlib.util.spec_from_file_location("torchreid_rank", path)
    module = importlib.util.module_from_spec(module_spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation is unavailable"
        module_spec.loader.exec_module(module)
    return module


def run(cfg: ReidEvalBench, argv: list[str] | None) -> dict:
    check(cfg)
    if cfg.out and cfg.out.is_dir():
        raise ValueError(f"--out {cfg.out} is a folder; name the JSON file to write")
    device = torch.device(cfg.device)
    rank = torchreid_rank_module()
    query, gallery, q_ids, g_ids, q_cams, g_cams = synthetic_set(cfg)
    on_device = [t.to(device) for t in (query, gallery, q_ids, g_ids, q_cams, g_cams)]
    results: dict[str, dict] = {}

    def ours() -> None:
        results["ours"] = rank_metrics(*on_device)

    def theirs() -> None:  # torchreid's engine: distances in torch on the CPU, ranking in numpy
        dist = (query.square().sum(1, keepdim=True) + gallery.square().sum(1)).addmm_(query, gallery.T, alpha=-2)
        cmc, m_ap = rank.evaluate_rank(dist.numpy(), q_ids.numpy(), g_ids.numpy(), q_cams.numpy(), g_cams.numpy(),
                                       max_rank=10)
        results["torchreid"] = {"mAP": 100 * float(m_ap), **{f"rank{k}": 100 * float(cmc[k - 1]) for k in (1, 5, 10)}}

    log(f"timing {cfg.repeats} rounds of {cfg.queries} x {cfg.gallery} ({cfg.dim}-d), ours on {device}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = time_round_robin({"ours": ours, "torchreid": theirs}, device, cfg.repeats, warmup=1)
    seconds = {name: quantiles(t) for name, t in times.items()}
    agree = all(abs(results["ours"][k] - results["torchreid"][k]) < 1e-3 for k in ("mAP", "rank1", "rank5", "rank10"))
    report = {
        **environment(device, "benchmarks.bench_reid_eval", argv), "settings": {**vars(cfg), "out": str(cfg.out)},
        "seconds": seconds, "speedup": seconds["torchreid"]["median"] / seconds["ours"]["median"],
        "metrics": results, "metrics_agree": agree, "block_mib": BLOCK_BYTES / 2**20,
        "peak_extra_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None,
    }
    print(f"{'':10s} {'median s':>9s} {'IQR s':>7s}   mAP    rank-1")
    for name, s in seconds.items():
        m = results[name]
        print(f"{name:10s} {s['median']:9.3f} {s['iqr']:7.3f}  {m['mAP']:6.2f}  {m['rank1']:6.2f}")
    print(f"speed-up {report['speedup']:.1f}x; the same metrics: {agree}"
          + (f"; peak extra device memory {report['peak_extra_mib']:.0f} MiB" if device.type == "cuda" else ""))
    if not agree:
        raise ValueError("ours and torchreid's metrics differ")
    if cfg.out:
        cfg.out.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    cfg = parse_settings(ReidEvalBench, "benchmarks.bench_reid_eval", __doc__, argv)
    return cli(lambda: run(cfg, argv))


if __name__ == "__main__":
    raise SystemExit(main())
