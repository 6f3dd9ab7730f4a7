"""PyTorch reference timings for the MSDeformAttn sampling core (side by side with
`cargo bench -p tgc-msda --bench msda`).

Run from the repository root, on the same machine, right before/after the criterion bench:
    python3 crates/tgc-msda/benches/msda_torch.py            # all cases
    python3 crates/tgc-msda/benches/msda_torch.py paper      # only the paper shape
Uses torch.set_num_threads(2) and the grid_sample reference from
tests/fixtures/make_fixture.py. Prints the median wall time of forward (no grad) and
forward+backward per case, as `torch <shape> b<batch> <fwd|fwd+bwd> <ms> ms`.
MSDA_TORCH_REPS=<k> overrides the number of timed repetitions (after one warm-up).
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from make_fixture import ms_deform_attn_reference  # noqa: E402

SHAPES = {
    # name: (levels, heads, head_dim, points, uniform locations, batches)
    "paper": ([(96, 96), (48, 48), (24, 24)], 8, 32, 4, False, (1, 8)),
    "cpu": ([(56, 56), (28, 28), (14, 14)], 4, 32, 4, False, (1, 8)),
    "paper-uniform": ([(96, 96), (48, 48), (24, 24)], 8, 32, 4, True, (1,)),
}


def locations(shapes, n, m, p, uniform):
    """Each query's reference point (its pixel centre normalised by its level's size) plus
    offsets of up to +-4 pixels of the sampled level, as in the Rust bench; `uniform`:
    uniform in [0, 1] (cache-hostile stress case)."""
    s = sum(h * w for h, w in shapes)
    if uniform:
        return torch.rand(n, s, m, len(shapes), p, 2)
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        refs.append(torch.stack([xs.flatten() / w, ys.flatten() / h], -1))
    refs = torch.cat(refs).view(1, s, 1, 1, 1, 2)
    inv = torch.tensor([[1.0 / w, 1.0 / h] for h, w in shapes]).view(1, 1, 1, len(shapes), 1, 2)
    return refs + (torch.rand(n, s, m, len(shapes), p, 2) * 8 - 4) * inv


def inputs(shapes, m, dh, p, n, uniform=False):
    s = sum(h * w for h, w in shapes)
    lq = s
    value = torch.randn(n, s, m, dh)
    loc = locations(shapes, n, m, p, uniform)
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
        shapes, m, dh, p, uniform, batches = SHAPES[name]
        for n in batches:
            value, loc, attn = inputs(shapes, m, dh, p, n, uniform)
            reps = int(os.environ.get("MSDA_TORCH_REPS", 5 if n == 1 else 3))

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
