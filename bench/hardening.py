"""`python -m bench _gpu_hardening`: the GPU-hardening findings checked on the real device (a part of
`python -m bench gpu`). Each check prints one `PASS` / `FAIL` / `INFO` line and the run goes on after a failure;
the exit status is 1 when any check failed.

  probe        torch's fp32-output GEMM overloads (mm(out_dtype), in-place addmm(out_dtype)); on torch >= 2.8
               both must be there, so the logits and dW take one cuBLAS call each
  autocast     the loss (chunked and fused, Triton, fp32 and bf16) under torch.autocast("cuda", bf16) equals the
               loss without it, gradients included (fused: within its run-to-run fp32-atomics noise)
  nan          a NaN hidden state of a live token makes loss and gradients NaN (the GPU's one-row epilogue
               programs and 128-row backward blocks)
  launch       every kernel configuration this device gets (compile_check's list for its architecture) launched
               once on small shapes and checked against the PyTorch backend; several processes compile at once
  fragmented   sizing under a fragmented caching allocator: inactive split blocks are excluded from the memory
               counted as available, and an auto-sized chunked loss runs without running out of memory
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
import time
import traceback

RESULTS: list[tuple[str, str, str]] = []


def say(status: str, name: str, detail: str = "") -> None:
    RESULTS.append((status, name, detail))
    print(f"{status:<5} {name}: {detail}", flush=True)


def _problem(dtype, B=4, T=33, H=64, V=1000, seed=0, device="cuda"):
    import torch

    g = torch.Generator().manual_seed(seed)
    p = dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g) * 0.1,
             selected_token_ids=torch.randint(0, V, (B, T), generator=g), attention_mask=torch.ones(B, T),
             advantages=torch.randn(B, generator=g))
    return {k: (v.to(device, dtype) if k in ("hidden", "weight") else v.to(device)) for k, v in p.items()}


def _loss(p, **opts):
    import grpo_kernels as gk

    args = dict(p)
    leaves = {k: args[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight")}
    args.update(leaves)
    loss, _ = gk.fused_linear_grpo_loss(**args, **opts)
    loss.backward()
    return [loss.detach()] + [leaves[k].grad for k in ("hidden", "weight")]


def check_probe() -> None:
    import torch

    from grpo_kernels import torch_ops

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    for dt in (torch.bfloat16, torch.float16):
        cap = torch_ops.fp32_gemm("cuda", dt)
        ok = cap.mm and cap.addmm
        status = "PASS" if ok else ("FAIL" if (major, minor) >= (2, 8) else "INFO")
        say(status, f"probe {dt}", f"torch {torch.__version__}: mm(out_dtype)={cap.mm}, in-place addmm={cap.addmm}")


def check_autocast() -> None:
    """Chunked is deterministic: autocast must change no bit. The fused backward accumulates dH/dW with fp32
    atomics, so its low bits vary from run to run: there autocast may differ from a plain call by no more than two
    plain calls differ from each other (an autocast bug would show as bf16-sized, ~1e-3 relative, differences)."""
    import torch

    def diff(xs, ys):
        return max((a.double() - b.double()).abs().max().item() for a, b in zip(xs, ys))

    for dt in (torch.float32, torch.bfloat16):
        for strategy in ("chunked", "fused"):
            p = _problem(dt, seed=1)
            opts = dict(strategy=strategy, backend="triton", chunk_size=48, loss_type="dapo")
            want = _loss(p, **opts)
            with torch.autocast("cuda", torch.bfloat16):
                got = _loss(p, **opts)
            d = diff(got, want)
            if strategy == "chunked":
                ok, detail = d == 0, "identical" if d == 0 else f"max |diff| {d:.3g}"
            else:
                noise = max(diff(_loss(p, **opts), want) for _ in range(3))
                ok = d <= noise
                detail = f"max |diff| {d:.3g}, run-to-run (fp32 atomics) {noise:.3g}"
            say("PASS" if ok else "FAIL", f"autocast {strategy} {dt}", detail)


def check_nan() -> None:
    import torch

    for strategy in ("chunked", "fused"):
        p = _problem(torch.bfloat16, seed=2)
        p["hidden"][1, 3, 7] = float("nan")
        loss, dh, dw = _loss(p, strategy=strategy, backend="triton", loss_type="dapo")
        ok = bool(torch.isnan(loss)) and bool(torch.isnan(dh[1, 3]).all()) and bool(torch.isnan(dw).all()) \
            and bool(torch.isfinite(dh[0]).all())
        say("PASS" if ok else "FAIL", f"nan {strategy}", f"loss {loss.item()}, NaN dH row {bool(torch.isnan(dh[1, 3]).all())}, "
            f"NaN dW {bool(torch.isnan(dw).all())}")


def launch_one(desc: tuple) -> tuple[str, str, str]:
    """Launch one configuration (kernel, dtype, flags, vocab) on small shapes against the torch backend."""
    kernel, dtype_name, flags = desc
    try:
        return _launch_one(kernel, dtype_name, dict(flags))
    except Exception as exc:
        return "FAIL", f"launch {kernel} {dtype_name} {flags}", f"{type(exc).__name__}: {str(exc)[:300]}"


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


def _launch_one(kernel: str, dtype_name: str, f: dict) -> tuple[str, str, str]:
    import torch

    from grpo_kernels import kernels as K
    from grpo_kernels import torch_ops

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-tf32": torch.float32}[dtype_name]
    torch.backends.cuda.matmul.allow_tf32 = f.get("PRECISION") == "tf32"
    tol = 1e-4 if dt == torch.float32 and f.get("PRECISION") != "tf32" else 2e-2
    name = f"launch {kernel} {dtype_name} {','.join(k for k, v in f.items() if v is True)}"
    g = torch.Generator(device="cuda").manual_seed(3)
    M, H, V = 300, 128, 1000
    h = torch.randn(M, H, device="cuda", generator=g).to(dt)
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.1).to(dt)
    b = (torch.randn(V, device="cuda", generator=g) * 0.1).to(dt) if f.get("HAS_BIAS") else None
    t = torch.randint(0, V, (M,), device="cuda", generator=g)
    if kernel == "_fused_stats_kernel":
        got = K.fused_linear_stats(h, w, b, t, 0.9, bool(f.get("WITH_ENTROPY")))
        want = torch_ops.fused_linear_stats(h.double(), w.double(), None if b is None else b.double(), t, 0.9,
                                            bool(f.get("WITH_ENTROPY")))
        err = max(_rel(x, y) for x, y in zip(got, want) if x is not None)
    elif kernel == "_fused_backward_kernel":
        lse, _, ent = torch_ops.fused_linear_stats(h.double(), w.double(), None if b is None else b.double(), t, 0.9,
                                                   True)
        grad = torch.randn(M, device="cuda", generator=g)
        eg = torch.randn(M, device="cuda", generator=g) if f.get("WITH_ENTROPY_GRAD") else None
        needs = (bool(f.get("NEED_H")), bool(f.get("NEED_W")), bool(f.get("NEED_B")) and b is not None)
        extra = dict(entropy=ent.float(), grad_entropy=eg) if eg is not None else {}
        got = K.fused_linear_backward(h, w, b, t, lse.float(), grad, 0.9, *needs, **extra)
        want = torch_ops.fused_linear_backward(h.double(), w.double(), None if b is None else b.double(), t, lse,
                                               grad.double(), 0.9, *needs,
                                               **({} if eg is None else dict(entropy=ent, grad_entropy=eg.double())))
        err = max(_rel(x, y) for x, y in zip(got, want) if x is not None)
    elif kernel == "_chunk_stats_kernel":
        v = f["V"]
        logits = torch.randn(M, v, device="cuda", generator=g) * 3
        tt = torch.randint(0, v, (M,), device="cuda", generator=g)
        got = K.chunk_stats(logits, tt, 0.9, bool(f.get("WITH_ENTROPY")))
        want = torch_ops.chunk_stats(logits.double(), tt, 0.9, bool(f.get("WITH_ENTROPY")))
        err = max(_rel(x, y) for x, y in zip(got, want) if x is not None)
    elif kernel == "_chunk_dlogits_kernel":
        v = f["V"]
        logits = torch_ops.empty_rows(M, v, torch.float32, "cuda")
        logits.copy_(torch.randn(M, v, device="cuda", generator=g) * 3)
        tt = torch.randint(0, v, (M,), device="cuda", generator=g)
        lse = torch.logsumexp(logits.double() / 0.9, 1)
        grad = torch.randn(M, device="cuda", generator=g)
        want = torch_ops.chunk_dlogits_(logits.double().clone(), tt, lse, grad.double(), 0.9)
        out = None if dtype_name == "fp32" else dt
        if f.get("WITH_ENTROPY_GRAD"):
            _, _, ent = torch_ops.chunk_stats(logits.double(), tt, 0.9, True)
            eg = torch.randn(M, device="cuda", generator=g)
            want = torch_ops.chunk_dlogits_(logits.double().clone(), tt, lse, grad.double(), 0.9, ent, eg.double())
            got = K.chunk_dlogits_(logits, tt, lse.float(), grad, 0.9, ent.float(), eg, out_dtype=out)
        else:
            got = K.chunk_dlogits_(logits, tt, lse.float(), grad, 0.9, out_dtype=out)
        err = _rel(got, want)
        tol = 1e-4 if out is None else 1e-2
    elif kernel == "_token_loss_kernel":
        from grpo_kernels.loss_math import TokenTerms, token_loss_and_grad
        from grpo_kernels.options import LossOptions

        kind = {0: "dapo", 1: "cispo", 2: "sapo", 3: "vespo"}[f["LOSS_KIND"]]
        n = 4000
        logp = -torch.rand(n, device="cuda", generator=g) * 3
        seq = torch.arange(n, device="cuda") // 100
        terms = TokenTerms(weight=torch.full((n,), 1.0 / n, device="cuda"), mask=torch.ones(n, device="cuda"),
                           adv=torch.randn(40, device="cuda", generator=g)[seq],
                           old=logp + 0.3 * torch.randn(n, device="cuda", generator=g),
                           ref=logp + 0.2 * torch.randn(n, device="cuda", generator=g),
                           rho=torch.rand(n, device="cuda", generator=g) + 0.5, seq=seq, num_seqs=40,
                           seq_len=torch.full((40,), 100.0, device="cuda"))
        opts = LossOptions(loss_type=kind, beta=0.04, delta=1.5 if kind == "dapo" else None)
        got = K.token_loss_grad(logp, terms, opts)
        want = token_loss_and_grad(logp.double(), terms, opts)
        err = max(_rel(got.loss, want.loss), _rel(got.grad, want.grad))
    else:
        return "INFO", name, "no launcher for this kernel (launched inside another wrapper)"
    torch.cuda.synchronize()
    return ("PASS" if err <= tol else "FAIL"), name, f"rel err {err:.2e} (tol {tol:.0e})"


def check_launch() -> None:
    import torch

    from grpo_kernels.compile_check import jobs_for

    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    descs = []
    for job in jobs_for(arch):
        f = dict(job.flags)
        if job.name.startswith("_chunk"):
            f["V"] = {4096: 5000, 2048: 2000, 1024: 1000}[dict(job.config)["BLOCK_V"]]
        if job.name == "_combine_kernel":
            continue  # runs inside fused_linear_stats whenever the vocabulary is split
        descs.append((job.name, job.dtype, tuple(sorted(f.items()))))
    workers = min(len(descs), max(1, (os.cpu_count() or 2) // 2), 8)
    t0 = time.monotonic()
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for status, name, detail in pool.map(launch_one, descs):
            say(status, name, detail)
    say("INFO", "launch", f"{len(descs)} configurations for sm_{arch} in {time.monotonic() - t0:.0f} s "
        f"on {workers} processes")


def check_fragmented() -> None:
    import torch

    from grpo_kernels import sizing

    dev = torch.device("cuda")
    # interleave large blocks and free every other one: the cache keeps segments with free holes in them
    keep, holes = [], []
    for i in range(64):
        (keep if i % 2 else holes).append(torch.empty(48 << 20, dtype=torch.uint8, device=dev))
    small = [t[: 1 << 20].clone() for t in holes[:8]]  # tiny allocations that split the freed blocks
    del holes
    stats = torch.cuda.memory_stats(dev)
    split = int(stats.get("inactive_split_bytes.all.current", 0))
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    avail = sizing.available_bytes(dev)
    say("INFO", "fragmented allocator", f"reserved - allocated {cached >> 20} MiB, inactive split {split >> 20} MiB, "
        f"available counted {avail >> 20} MiB")
    p = _problem(torch.bfloat16, B=16, T=512, H=256, V=32000, seed=4)
    try:
        loss, dh, dw = _loss(p, strategy="chunked", backend="triton", loss_type="dapo")
        ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(dw).all())
        say("PASS" if ok else "FAIL", "fragmented chunked loss", f"loss {loss.item():.6f}, auto chunk sizing ran")
    except torch.OutOfMemoryError as exc:
        say("FAIL", "fragmented chunked loss", f"OutOfMemoryError: {str(exc)[:300]}")
    del keep, small


CHECKS = [("probe", check_probe), ("autocast", check_autocast), ("nan", check_nan), ("launch", check_launch),
          ("fragmented", check_fragmented)]


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        say("FAIL", "device", "no CUDA device")
        return 1
    print(f"device {torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
          f"torch {torch.__version__}", flush=True)
    for name, fn in CHECKS:
        try:
            fn()
        except Exception:
            say("FAIL", name, traceback.format_exc().strip().splitlines()[-1][:300])
    failed = [r for r in RESULTS if r[0] == "FAIL"]
    print(f"hardening: {sum(r[0] == 'PASS' for r in RESULTS)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
