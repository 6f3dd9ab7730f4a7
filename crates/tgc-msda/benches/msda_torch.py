"""PyTorch reference timings for the MSDeformAttn sampling core (side by side with
`cargo bench -p tgc-msda --bench msda`).

Run from the repository root, on the same machine, right before/after the criterion bench:
    python3 crates/tgc-msda/benches/msda_torch.py            # all cases
    python3 crates/tgc-msda/benches/msda_torch.py paper      # only the paper shape
Uses torch.set_num_threads(2) and the grid_sample reference from
tests/fixtures/make_fixture.py. Prints the median wall time of forward (no grad) and
forward+backward per case, as `torch <shape> b<batch> <fwd|fwd+bwd> <ms> ms`.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from make_fixture import ms_deform_attn_reference  # noqa: E402

SHAPES = {
    # name: (levels, heads, head_dim, points)
    "paper": ([(96, 96), (48, 48), (24, 24)], 8, 32, 4),
    "cpu": ([(56, 56), (28, 28), (14, 14)], 4, 32, 4),
}


def inputs(shapes, m, dh, p, n):
    s = sum(h * w for h, w in shapes)
    lq = s
    value = torch.randn(n, s, m, dh)
    loc = torch.rand(n, lq, m, len(shapes), p, 2)
    attn = torch.softmax(torch.randn(n, lq, m, len(shapes) * p), -1).view(n, lq, m, len(shapes), p)
    return value, loc, attn


def timeit(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    torch.set_num_threads(2)
    only = sys.argv[1:] or list(SHAPES)
    for name in only:
        shapes, m, dh, p = SHAPES[name]
        for n in (1, 8):
            value, loc, attn = inputs(shapes, m, dh, p, n)
            reps = 5 if n == 1 else 3

            def fwd():
                with torch.no_grad():
                    ms_deform_attn_reference(value, shapes, loc, attn)

            leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
            grad_out = torch.randn(n, sum(h * w for h, w in shapes), m * dh)

            def fwd_bwd():
                for t in leaves:
                    t.grad = None
                out = ms_deform_attn_reference(leaves[0], shapes, leaves[1], leaves[2])
                out.backward(grad_out)

            print(f"torch {name} b{n} fwd {timeit(fwd, reps):.1f} ms", flush=True)
            print(f"torch {name} b{n} fwd+bwd {timeit(fwd_bwd, reps):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
