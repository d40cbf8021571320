"""Measuring one implementation: correctness gate, time, peak memory, roofline.

Runs inside a worker (its own process, so CPU peak RSS belongs to one implementation) or in-process.
GPU: CUDA events around each call, L2 flushed between calls, torch.cuda.max_memory_allocated above what was
allocated before the call. CPU: time.perf_counter, and the peak RSS above the RSS before the call, read from
/proc/self/status after resetting the high-water mark, with glibc's mmap threshold pinned at 64 KiB during the
call so that every buffer the call allocates counts (falls back to ru_maxrss in a fresh process).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import platform
import resource
import statistics
import time
import traceback
from typing import Callable

import torch

from . import shapes
from .impls import Impl, expected_buffer_bytes, extra_bytes_estimate, get_impl

# Relative-norm tolerances against the float64 reference. fp32 on the GPU: Triton's fp32 tl.dot uses TF32
# (~3e-4), so 1e-3 there; plain fp32 arithmetic lands far under 1e-4.
TOLERANCES = {("cpu", "fp32"): 1e-4, ("cuda", "fp32"): 1e-3, ("cpu", "fp16"): 1e-2, ("cuda", "fp16"): 1e-2}
BF16_TOL = 2e-2

# The correctness shape: small, odd sizes (multiples of no block size), padding and a zero-advantage sequence.
CHECK_SHAPE = {"batch": 4, "seq_len": 37, "hidden": 96, "vocab": 1531}


def tolerance(device: torch.device, dtype: str) -> float:
    if dtype == "bf16":
        return BF16_TOL
    return TOLERANCES[(device.type, dtype)]


# ------------------------------------------------------------------------------------------------ memory


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if platform.system() == "Darwin" else r * 1024


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 64 << 10


@contextlib.contextmanager
def every_allocation_mapped():
    """During the memory call, glibc gives every allocation of 64 KiB or more its own mapping, so that RSS rises
    by each buffer the call touches and falls when it is freed: peak RSS minus RSS before then counts every such
    byte allocated during the call. Outside it, glibc's dynamic threshold keeps freed buffers up to 32 MiB in its
    heap, where a buffer that reuses freed pages adds nothing to RSS (the chunked strategy's 32 MiB fp32 buffer
    once measured as 0 MiB). Afterwards the threshold is set to 32 MiB and the trim threshold to 64 MiB, where
    glibc's dynamic rule leaves them once buffers that large have been freed, so that timing runs as before.
    Yields False (nothing changed) without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield False
        return
    trim(0)  # hand freed heap pages back first: the baseline RSS holds only live memory
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    try:
        yield True
    finally:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def peak_extra_bytes(run: Callable[[], None], device: torch.device) -> tuple[int | None, str, float]:
    """Peak memory of one `run()` above what was in use just before it, how it was measured, and the call's
    wall time in ms (on CPU it doubles as a timed rep: reading /proc costs microseconds)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        ms = (time.perf_counter() - t0) * 1e3
        return torch.cuda.max_memory_allocated(device) - base, "cuda.max_memory_allocated", ms
    with every_allocation_mapped() as mapped:
        if reset_peak_rss():
            base = _proc_status_kib("VmRSS")
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
            peak = _proc_status_kib("VmHWM")
            how = "VmHWM-VmRSS (peak RSS reset per case" + (", glibc mmap threshold 64 KiB)" if mapped else ")")
            return (peak - base) * 1024, how, ms
    # fresh process per case: ru_maxrss so far is the baseline (inputs built, warm-up not yet run)
    base = _ru_maxrss_bytes()
    t0 = time.perf_counter()
    run()
    ms = (time.perf_counter() - t0) * 1e3
    return _ru_maxrss_bytes() - base, "ru_maxrss (fresh process)", ms


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return avail if avail is not None else 1 << 62


# ------------------------------------------------------------------------------------------------ time


def _summary(times_ms: list[float]) -> dict:
    qs = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 9
    return {
        "median_ms": statistics.median(times_ms),
        "p20_ms": qs[1],
        "p80_ms": qs[7],
        "min_ms": min(times_ms),
        "reps": len(times_ms),
        "times_ms": times_ms,
    }


def time_fn(
    run: Callable[[], None],
    device: torch.device,
    budget_s: float = 2.0,
    min_reps: int = 5,
    max_reps: int = 100,
    warmup: int = 1,
    first_ms: float | None = None,
) -> dict:
    """Median/p20/p80 of repeated `run()` after `warmup` calls; as many reps as fit in `budget_s`
    (at least min_reps). GPU: CUDA events, L2 flushed before each call (outside the timed region).
    CPU: `first_ms`, when given, is an already-measured warm call that counts as the first rep."""
    if device.type == "cuda":
        return _time_cuda(run, device, budget_s, min_reps, max_reps, warmup)
    for _ in range(warmup):
        run()
    if first_ms is None:
        t0 = time.perf_counter()
        run()
        first_ms = (time.perf_counter() - t0) * 1e3
    first = first_ms / 1e3
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-9))))
    times = [first_ms]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


_FLUSH: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)  # > any L2 so far
    return _FLUSH[device]


def _time_cuda(run, device, budget_s, min_reps, max_reps, warmup):
    flush = _l2_flush_buffer(device)
    for _ in range(max(warmup, 2)):
        run()
    torch.cuda.synchronize(device)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    run()
    e.record()
    torch.cuda.synchronize(device)
    est_ms = max(s.elapsed_time(e), 1e-3)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / est_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([a.elapsed_time(b) for a, b in zip(starts, ends)])


def gemm_rate(dtype: str, device: torch.device, budget_s: float = 1.0) -> dict:
    """TFLOP/s of a large square matmul in `dtype`: the ceiling the roofline column is read against."""
    n = 8192 if device.type == "cuda" else 1536
    g = torch.Generator(device=device)
    g.manual_seed(1)
    a = torch.randn(n, n, generator=g, device=device).to(shapes.DTYPES[dtype])
    b = torch.randn(n, n, generator=g, device=device).to(shapes.DTYPES[dtype])
    stats = time_fn(lambda: torch.mm(a, b), device, budget_s=budget_s, min_reps=3, max_reps=50, warmup=2)
    flops = 2.0 * n**3
    return {"n": n, "dtype": dtype, "tflops": flops / (stats["median_ms"] * 1e-3) / 1e12, **stats}


def roofline(flops: float, median_ms: float, gemm_tflops: float | None) -> dict:
    tflops = flops / (median_ms * 1e-3) / 1e12
    out = {"tflops": tflops, "pct_gemm": None, "floor_ms": None, "x_floor": None}
    if gemm_tflops:
        out["pct_gemm"] = 100.0 * tflops / gemm_tflops
        out["floor_ms"] = flops / (gemm_tflops * 1e12) * 1e3
        out["x_floor"] = median_ms / out["floor_ms"]
    return out


# ------------------------------------------------------------------------------------------------ check


def _rel(out: torch.Tensor | None, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if out is None:
        return math.inf
    out = out.detach().double().cpu().reshape(ref.shape)
    ref = ref.detach().double().cpu()
    if mask is not None:
        out, ref = out * mask, ref * mask
    if not torch.isfinite(out).all():
        return math.nan
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def check_case(mode: str, dtype: str) -> shapes.Case:
    c = CHECK_SHAPE
    return shapes.Case(mode, "check", c["hidden"], c["vocab"], c["batch"] * c["seq_len"], c["seq_len"], dtype, 0.2, 0.25)


def correctness(impl: Impl, mode: str, dtype: str, opts: dict, device: torch.device, seed: int = 1234) -> dict:
    """Run `impl` on the check shape and compare with grpo_kernels.reference in float64.

    Loss mode: loss, d hidden and d weight by relative norm error. Logprobs mode: log-probs on real tokens.
    The advantages are shifted away from mean zero so the scalar loss is not a cancellation-prone ~0."""
    from grpo_kernels import reference as R

    case = check_case(mode, dtype)
    x = shapes.make_inputs(case, device, seed=seed, beta=opts.get("beta", 0.0), temperature=opts.get("temperature", 1.0))
    x["advantages"] = torch.where(x["advantages"] != 0, x["advantages"] + 1.0, x["advantages"])
    tol = tolerance(device, dtype)
    errors: dict[str, float] = {}
    x64 = {k: v.detach().double() if v.is_floating_point() else v for k, v in x.items()}
    t = opts.get("temperature", 1.0)
    fn = impl.make(mode, x, opts)
    if mode == "loss":
        h64 = x64["hidden"].clone().requires_grad_(True)
        w64 = x64["weight"].clone().requires_grad_(True)
        from .impls import loss_options

        ref_loss, _ = R.reference_fused_linear_grpo_loss(
            h64, w64, x["ids"], x["mask"], x64["advantages"],
            ref_per_token_logps=x64.get("ref"), old_per_token_logps=x64["old"], **loss_options(opts),
        )  # fmt: skip
        ref_loss.backward()
        loss = fn()
        loss.backward()
        errors["loss"] = _rel(loss.reshape(()), ref_loss.reshape(()))
        errors["d_hidden"] = _rel(x["hidden"].grad, h64.grad)
        errors["d_weight"] = _rel(x["weight"].grad, w64.grad)
    else:
        ref_logp, _ = R.reference_logprobs(x64["hidden"], x64["weight"], x["ids"], temperature=t)
        with torch.no_grad():
            logp = fn()
        errors["logp"] = _rel(logp, ref_logp, mask=x["mask"].double().cpu())
    bad = {k: v for k, v in errors.items() if not (v <= tol)}  # NaN fails
    return {
        "ok": not bad,
        "tol": tol,
        "errors": errors,
        "shape": case.to_dict(),
        "error": None if not bad else "relative error above tolerance: " + ", ".join(f"{k}={v:.3g}" for k, v in bad.items()),
    }


# ------------------------------------------------------------------------------------------------ worker


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]


def make_runner(mode: str, fn: Callable, x: dict) -> Callable[[], None]:
    if mode == "loss":
        h, w = x["hidden"], x["weight"]

        def run():
            h.grad = None
            w.grad = None
            fn().backward()

        return run

    def run_nograd():
        with torch.no_grad():
            fn()

    return run_nograd


def bench_case(impl: Impl, case: shapes.Case, opts: dict, device: torch.device, timing: dict, seed: int) -> dict:
    rec: dict = {"impl": impl.name, "case": case.to_dict()}
    need = shapes.input_bytes(case) + shapes.grad_bytes(case) + extra_bytes_estimate(impl, case)
    avail = available_bytes(device)
    rec["estimated_bytes"] = need
    if need > 0.9 * avail:
        rec.update(status="skipped", error=f"would not fit: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free")
        return rec
    x = None
    try:
        x = shapes.make_inputs(case, device, seed=seed, beta=opts.get("beta", 0.0), temperature=opts.get("temperature", 1.0))
        rec["realized"] = shapes.realized_sparsity(x)
        fn = impl.make(case.mode, x, opts)
        run = make_runner(case.mode, fn, x)
        t0 = time.perf_counter()
        run()  # first call: compilation, autotuning, allocator growth stay out of memory and time
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec["first_call_s"] = time.perf_counter() - t0
        mem_ms = None
        if timing.get("memory", True):
            rec["extra_bytes"], rec["memory_method"], mem_ms = peak_extra_bytes(run, device)
            rec["expected_bytes"] = expected_buffer_bytes(impl, case, device)
        rec["time"] = time_fn(
            run, device, timing["budget_s"], timing["min_reps"], timing["max_reps"], timing["warmup"],
            first_ms=None,  # the memory call ran with every buffer freshly mapped (page faults): not a timed rep
        )  # fmt: skip
        rec["status"] = "ok"
    except Exception as exc:  # one failing shape must not stop the sweep
        rec["status"] = "oom" if _is_oom(exc) else "error"
        rec["error"] = _short(exc)
        if rec["status"] == "error":
            rec["traceback"] = traceback.format_exc()[-3000:]
    finally:
        del x
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def run_impl_task(task: dict, emit: Callable[[dict], None]) -> None:
    """Worker body: gate `task['impl']` on correctness per dtype, then measure every case; emit one dict per case."""
    device = torch.device(task["device"])
    impl = get_impl(task["impl"])
    cases = [shapes.Case.from_dict(c) for c in task["cases"]]
    opts = task["opts"]
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    reason = impl.unavailable(device, cases[0].mode) if cases else None
    if reason:
        for c in cases:
            emit({"impl": impl.name, "case": c.to_dict(), "status": "unavailable", "error": reason})
        return
    gates: dict[str, dict] = {}
    for c in cases:
        if c.dtype not in gates:
            if task.get("check", True):
                try:
                    gates[c.dtype] = correctness(impl, c.mode, c.dtype, opts, device, seed=task.get("seed", 0) + 1234)
                except Exception as exc:
                    gates[c.dtype] = {"ok": False, "error": _short(exc), "traceback": traceback.format_exc()[-3000:]}
            else:
                gates[c.dtype] = {"ok": True, "skipped": True}
        gate = gates[c.dtype]
        if not gate["ok"]:
            emit({"impl": impl.name, "case": c.to_dict(), "status": "failed", "error": gate.get("error"), "check": gate})
            continue
        rec = bench_case(impl, c, opts, device, task["timing"], task.get("seed", 0))
        rec["check"] = gate
        emit(rec)


def env_task(task: dict) -> dict:
    """Device, versions and the GEMM ceilings of the run's dtypes."""
    device = torch.device(task["device"])
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    info: dict = {
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "peak_rss_resettable": reset_peak_rss(),
    }
    for mod in ("triton", "liger_kernel", "cut_cross_entropy", "trl", "transformers"):
        info[mod] = _version(mod)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, sm_count=p.multi_processor_count, memory_bytes=p.total_memory)
        info["capability"] = f"{p.major}.{p.minor}"
    else:
        info["device_name"] = f"CPU ({info['cpu']}, {info['cpu_threads']} threads)"
    rates = {}
    for dt in task.get("dtypes", ["fp32"]):
        try:
            rates[dt] = gemm_rate(dt, device, budget_s=task.get("gemm_budget_s", 1.0))
        except Exception as exc:
            rates[dt] = {"error": _short(exc), "tflops": None}
    info["gemm"] = rates
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(mod: str) -> str | None:
    import importlib.metadata as md

    names = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}
    try:
        return md.version(names.get(mod, mod))
    except md.PackageNotFoundError:
        return None


def worker_main(task: dict, emit: Callable[[dict], None]) -> None:
    """Worker body of the 'env' and 'impl' task kinds (bench.step.run_step_task serves 'step')."""
    if task["kind"] == "env":
        emit({"env": env_task(task)})
    elif task["kind"] == "impl":
        run_impl_task(task, emit)
    else:
        raise ValueError(f"unknown worker task kind {task['kind']!r}")
