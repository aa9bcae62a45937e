"""Coverage of the 95% intervals of the stochastic trace estimators, measured.

For a dense symmetric matrix with a known spectrum, runs each estimator with many seeds
and counts how often its reported 95% interval holds the true trace, printing the
coverage with its binomial standard error. Run by hand:

    python benchmarks/bench_coverage.py --seeds 300
"""

from __future__ import annotations

import argparse
import math

import torch

from hessdiag.curvature import hutchinson, hutchpp, slq


def matrix(dim: int, seed: int) -> tuple[torch.Tensor, float]:
    """A symmetric matrix with a few dominant eigenvalues and a bulk, like a Hessian."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    ev = torch.cat([torch.tensor([40.0, 25.0, 10.0], dtype=torch.float64),
                    torch.randn(dim - 3, generator=gen, dtype=torch.float64).abs() * 0.5
                    - 0.1])
    return (Q * ev) @ Q.T, float(ev.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=300)
    parser.add_argument("--dim", type=int, default=200)
    args = parser.parse_args()
    A, truth = matrix(args.dim, 0)
    def slq_trace(s: int):
        result = slq(A, 10, 20, seed=s)
        return result.trace_ci95(), result.trace()

    estimators = {
        "hutchinson, 30 probes": lambda s: (lambda r: (r.ci95, (r.estimate, r.stderr)))(
            hutchinson(A, 30, seed=s)),
        "hutch++, 30 products": lambda s: (lambda r: (r.ci95, (r.estimate, r.stderr)))(
            hutchpp(A, 30, seed=s)),
        "slq, 10 probes x 20 steps": slq_trace,
    }
    print(f"dim {args.dim}, true trace {truth:.4f}, {args.seeds} seeds, nominal 0.95")
    print(f"{'estimator':28s} {'t-interval (reported)':>22s} {'normal 1.96 s.e.':>20s}")
    for name, run in estimators.items():
        t_hits = z_hits = 0
        for s in range(args.seeds):
            (lo, hi), (estimate, stderr) = run(s)
            t_hits += lo <= truth <= hi
            z_hits += abs(estimate - truth) <= 1.96 * stderr
        cells = []
        for hits in (t_hits, z_hits):
            p = hits / args.seeds
            cells.append(f"{p:.3f} ± {math.sqrt(p * (1 - p) / args.seeds):.3f}")
        print(f"{name:28s} {cells[0]:>22s} {cells[1]:>20s}")


if __name__ == "__main__":
    main()
