"""The C++ chunk epilogue against the PyTorch path, interleaved call by call (GRPO_KERNELS_NATIVE toggled
between calls) so that a busy, shared machine slows both alike.

    python -m bench.epilogue [--shapes 1024x8192,1024x49152] [--reps 15] [--entropy]
        the epilogue alone: chunk_stats + chunk_dlogits_ on one [M, V] fp32 chunk
    python -m bench.epilogue --loss [--shapes 1024x256x8192,2048x576x49152] [--reps 9]
        the whole loss as `python -m bench loss` times ours-auto (fused_linear_grpo_loss forward + backward, dapo,
        the bench's inputs: bench.shapes.make_inputs with 256-token sequences)

Prints, per shape, the median and 20th-80th percentile of each path and the median of the per-pair
speed-ups (torch time / native time of adjacent calls). A benchmark, not a test.
"""
import argparse
import os
import statistics
import time

import torch

from grpo_kernels import native, torch_ops


def one(x, t, g, ge, entropy: bool):
    buf = x.clone()
    start = time.perf_counter()
    lse, logp, ent = torch_ops.chunk_stats(buf, t, 1.0, entropy)
    kw = dict(entropy=ent, grad_entropy=ge) if entropy else {}
    torch_ops.chunk_dlogits_(buf, t, lse, g, 1.0, **kw)
    return time.perf_counter() - start


def loss_call(x):
    import grpo_kernels as gk
    hidden, weight = x["hidden"], x["weight"]
    hidden.grad = weight.grad = None
    start = time.perf_counter()
    loss, _ = gk.fused_linear_grpo_loss(hidden, weight, x["ids"], x["mask"], x["advantages"],
                                        old_per_token_logps=x["old"], loss_type="dapo")
    loss.backward()
    return time.perf_counter() - start


def report(name, times):
    q = {k: statistics.quantiles(ts, n=5) for k, ts in times.items()}
    med = {k: statistics.median(ts) for k, ts in times.items()}
    pair = statistics.median(a / b for a, b in zip(times["0"], times["1"]))
    print(f"{name}: native {med['1']:.1f} ms ({q['1'][0]:.1f}-{q['1'][3]:.1f}), "
          f"torch {med['0']:.1f} ms ({q['0'][0]:.1f}-{q['0'][3]:.1f}), "
          f"speed-up {med['0'] / med['1']:.2f}x (median of pairs {pair:.2f}x)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--loss", action="store_true", help="time the whole loss (shapes NxHxV)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--entropy", action="store_true", help="entropy and its gradient too")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("native extension not available")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, entropy={args.entropy}")
    if args.loss:
        from bench.shapes import Case, make_inputs
        for shape in (args.shapes or "1024x256x8192,2048x576x49152").split(","):
            n, h, v = (int(s) for s in shape.split("x"))
            x = make_inputs(Case("loss", "cli", h, v, n, 256, "fp32"), "cpu")
            times = {"1": [], "0": []}
            for rep in range(args.reps + 1):
                for flag in ("1", "0") if rep % 2 else ("0", "1"):
                    os.environ["GRPO_KERNELS_NATIVE"] = flag
                    dt = loss_call(x)
                    if rep:
                        times[flag].append(dt * 1e3)
            report(f"loss N={n} H={h} V={v}", times)
        return
    for shape in (args.shapes or "1024x8192,1024x49152").split(","):
        m, v = (int(s) for s in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(m, v, generator=gen) * 2
        t = torch.randint(0, v, (m,), generator=gen)
        g, ge = torch.randn(m, generator=gen), torch.randn(m, generator=gen)
        times = {"1": [], "0": []}
        for rep in range(args.reps + 1):
            for flag in ("1", "0") if rep % 2 else ("0", "1"):
                os.environ["GRPO_KERNELS_NATIVE"] = flag
                dt = one(x, t, g, ge, args.entropy)
                if rep:  # the first rep warms up both
                    times[flag].append(dt * 1e3)
        report(f"epilogue {m}x{v}", times)


if __name__ == "__main__":
    main()
