"""`python -m grpo_kernels.compile_check --arch 80,86,89,90`: compile, without a GPU, the kernel configurations the
library launches on each architecture, and check their resources.

For every kernel, dtype and flag combination, with the tile each architecture gets (kernels/configs.py), Triton
compiles for the target through ptxas; cuobjdump reads registers, spills (local memory) and the tensor-core
instructions of the SASS, and Triton's metadata gives the shared memory. One table per kernel and architecture is
printed. The exit status is 1 when a configuration needs more shared memory than the architecture allows per
block (it could not launch), spills registers on sm_90, or, on an architecture with tensor cores, runs a 16-bit
GEMM kernel without them (operands upcast); 0 otherwise.

Scope: by default the flags that only add code (bias, entropy, the gradient outputs, the gradient filter) are
compiled all on, the variant that bounds shared memory and registers, for every kernel x dtype x tile x the flags
that change the tile (entropy gradient, packed output); `--all` compiles every flag combination the library can
launch (several hundred compiles per architecture, many minutes). Compiles run in parallel (`-j`, default: the
CPU count) and land in Triton's cache, so a second run takes seconds.

Default architectures: those of the visible GPUs, else sm_80, sm_86, sm_89 and sm_90, plus sm_100 when the
installed Triton can target it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

from . import env_flags

BASE_ARCHS = (80, 86, 89, 90)
SPILL_FAIL_ARCHS = (90,)
_TY = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp32-tf32": "fp32"}
_DIV16 = {"H", "stride_hm", "stride_wv", "stride_row", "stride_out"}  # what aligned tensors and H % 16 == 0 give


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a kernel, the dtype of its GEMM operands (or of its output), constexpr flags, tile config."""

    kernel: str          # module:function under grpo_kernels.kernels
    dtype: str           # bf16 | fp16 | fp32 | fp32-tf32
    flags: tuple         # ((name, value), ...) constexpr flags
    config: tuple        # ((name, value), ...) tile constexprs and num_warps / num_stages
    arch: int
    gemm: bool = False   # a tl.dot kernel: 16-bit dtypes must use tensor cores

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]

    def describe_config(self) -> str:
        c = dict(self.config)
        tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K", "BLOCK") if k in c)
        return f"{tile} w{c.get('num_warps', 4)} s{c.get('num_stages', 3)}"

    def describe_flags(self) -> str:
        on = [k for k, v in self.flags if v is True]
        other = [f"{k}={v}" for k, v in self.flags if not isinstance(v, bool)]
        return ",".join(on + other) or "-"


@dataclasses.dataclass
class Result:
    job: Job
    regs: int | None = None
    smem: int | None = None
    spill: int | None = None
    tensor_cores: str = "?"
    seconds: float = 0.0
    error: str = ""
    problems: list = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------- what gets compiled

def _flag_sets(names, all_combinations: bool, valid=lambda f: True, fixed=None):
    """Dicts of boolean constexpr flags: every valid combination, or the one with every flag on."""
    fixed = fixed or {}
    if not all_combinations:
        return [dict(dict.fromkeys(names, True), **fixed)]
    out = []
    for values in itertools.product((False, True), repeat=len(names)):
        f = dict(zip(names, values), **fixed)
        if valid(f):
            out.append(f)
    return out


def jobs_for(arch: int, all_combinations: bool = False) -> list[Job]:
    """Every configuration the library launches on `arch` (see the module docstring for the default scope)."""
    import torch

    from .kernels import chunk_epilogue as ce
    from .kernels import configs

    cap = (arch // 10, arch % 10)
    smem = configs.ARCH_SMEM.get(arch, 48 * 1024)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-tf32": torch.float32}
    jobs = []

    def add(kernel, dtype, flags, config, gemm=False):
        jobs.append(Job(kernel, dtype, tuple(sorted(flags.items())), tuple(sorted(config.items())), arch, gemm))

    # chunk epilogue: the library's buffer is fp32; the tile follows V (4096 columns for V > 2048, 8 warps from
    # 2048; smaller vocabularies get smaller tiles of the 4-warp shape)
    for v in (128256, 2048, 1024):
        cfg = ce._config(v)
        for ent in (True, False) if all_combinations else (True,):
            add("chunk_epilogue:_chunk_stats_kernel", "fp32", dict(WITH_ENTROPY=ent), cfg)
        for out in ("fp32", "bf16", "fp16"):
            for eg in (True, False) if all_combinations else (True,):
                add("chunk_epilogue:_chunk_dlogits_kernel", out, dict(WITH_ENTROPY_GRAD=eg, PACKED=out != "fp32"), cfg)

    for name, torch_dtype in dt.items():
        precision = "tf32" if name == "fp32-tf32" else "ieee"
        fwd = configs.fused_forward_config(cap, smem, torch_dtype)
        for f in _flag_sets(("HAS_BIAS", "WITH_ENTROPY"), all_combinations):
            for single in (False, True) if all_combinations else (False,):
                add("fused_forward:_fused_stats_kernel", name,
                    dict(f, SINGLE_SPLIT=single, DOT_FP32=False, PRECISION=precision), fwd, gemm=True)
        for eg in (False, True):  # the entropy gradient changes the tile choice: both always
            bwd = configs.fused_backward_configs(cap, smem, torch_dtype, eg)[0]
            for f in _flag_sets(("HAS_BIAS", "NEED_H", "NEED_W", "NEED_B"), all_combinations,
                                valid=lambda f: (f["HAS_BIAS"] or not f["NEED_B"])
                                and (f["NEED_H"] or f["NEED_W"] or f["NEED_B"])):
                add("fused_backward:_fused_backward_kernel", name,
                    dict(f, WITH_ENTROPY_GRAD=eg, FILTER=True, COUNT_SKIPS=False, DOT_FP32=False, PRECISION=precision),
                    bwd, gemm=True)
    for ent in (True, False) if all_combinations else (True,):
        add("fused_forward:_combine_kernel", "fp32", dict(WITH_ENTROPY=ent), dict(BLOCK_M=256, num_warps=4))

    from .kernels import token_loss as tlk
    for kind in (tlk.CLIPPED, tlk.CISPO, tlk.SAPO, tlk.VESPO):
        for f in _flag_sets(("HAS_OLD", "HAS_REF", "HAS_RHO", "BIAS_CORR", "HAS_DELTA", "NEED_GRAD"), all_combinations,
                            valid=lambda f: f["HAS_REF"] or not f["BIAS_CORR"]):
            add("token_loss:_token_loss_kernel", "fp32", dict(f, LOSS_KIND=kind),
                dict(BLOCK=tlk.BLOCK, num_warps=tlk.NUM_WARPS))
    return jobs


# ------------------------------------------------------------------------------------------------- compiling

def _arg_type(name: str, dtype: str) -> str:
    if name in ("h_ptr", "w_ptr", "b_ptr", "out_ptr"):  # the chunk's logits buffer (logits_ptr) is fp32 always
        return "*" + _TY[dtype]
    if name in ("t_ptr", "targets_ptr"):
        return "*i64"
    if name == "skip_ptr":
        return "*i32"
    if name.endswith("_ptr"):
        return "*fp32"
    return {"inv_t": "fp32", "filter_eps": "fp32", "plane": "i64", "lo": "fp32", "hi": "fp32", "delta": "fp32",
            "eps_high": "fp32", "beta": "fp32", "kappa_pos": "fp32", "kappa_neg": "fp32"}.get(name, "i32")


def _tool(name: str) -> str | None:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


_TC = re.compile(r"\b(HGMMA|HMMA|UTC\w*MMA\w*|QGMMA|IMMA)\b")


def _sass_usage(kernel) -> dict | None:
    """Registers, static shared memory, spills and tensor-core opcodes of a compiled kernel from cuobjdump (one
    call), remembered beside Triton's cache under the cubin's hash (a warm run then starts no process at all);
    None without cuobjdump."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return None
    from triton import knobs

    memo = os.path.join(knobs.cache.dir, "grpo_kernels_compile_check", f"{kernel.metadata.hash}.json")
    try:
        with open(memo) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", "-sass", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    tc = sorted(set(_TC.findall(out)))
    usage = dict(regs=int(fields.get("REG", 0)), static_smem=int(fields.get("SHARED", 0)),
                 spill=max(int(fields.get("LOCAL", 0)), int(fields.get("STACK", 0))),
                 tensor_cores="/".join(tc) if tc else "-")
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        with open(memo + ".tmp", "w") as f:
            json.dump(usage, f)
        os.replace(memo + ".tmp", memo)
    except OSError:
        pass
    return usage


def compile_job(job: Job) -> Result:
    """Compile one job for its architecture and read its resources (never raises: errors land in the Result)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(job)
    t0 = time.monotonic()
    try:
        module, fn_name = job.kernel.split(":")
        fn = getattr(importlib.import_module(f"grpo_kernels.kernels.{module}"), fn_name)
        consts = dict(job.flags)
        cfg = dict(job.config)
        opts = dict(num_warps=cfg.pop("num_warps", 4), num_stages=cfg.pop("num_stages", 3), enable_fp_fusion=True)
        consts.update(cfg)
        sig = {n: "constexpr" if n in consts else _arg_type(n, job.dtype) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (sig[n].startswith("*") or n in _DIV16)}
        k = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", job.arch, 32),
                           options=opts)
        res.smem = int(k.metadata.shared)
        usage = _sass_usage(k)
        if usage is not None:
            res.regs = usage["regs"]
            res.smem += usage["static_smem"]  # static shared memory, beside Triton's dynamic
            res.spill = usage["spill"]
            res.tensor_cores = usage["tensor_cores"]
    except Exception as exc:  # a compile that fails is a finding, not a crash of the check
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    res.seconds = time.monotonic() - t0
    return res


def judge(res: Result) -> list[str]:
    """Why a compiled configuration fails the check (empty: it passes)."""
    from .kernels.configs import ARCH_SMEM

    job = res.job
    if res.error:
        return [f"compile failed: {res.error}"]
    out = []
    limit = ARCH_SMEM.get(job.arch)
    if limit is not None and res.smem is not None and res.smem > limit:
        out.append(f"shared memory {res.smem} B > {limit} B per block on sm_{job.arch}: cannot launch")
    if job.arch in SPILL_FAIL_ARCHS and res.spill:
        out.append(f"spills {res.spill} B/thread on sm_{job.arch}")
    if job.gemm and job.dtype in ("bf16", "fp16") and res.tensor_cores == "-":
        out.append("16-bit GEMM without tensor-core instructions")
    return out


# ------------------------------------------------------------------------------------------------ reporting

def format_tables(results: list[Result]) -> str:
    from .kernels.configs import ARCH_SMEM

    lines = []
    key = lambda r: (r.job.name, r.job.arch)  # noqa: E731
    for (name, arch), group in itertools.groupby(sorted(results, key=key), key=key):
        group = list(group)
        lines.append(f"\n{name} on sm_{arch} (shared memory per block: {ARCH_SMEM.get(arch, '?')} B)")
        header = f"  {'dtype':<10}{'config':<20}{'regs':>5}{'smem B':>9}{'spill B':>8}  {'tensor cores':<13}{'':<5}flags"
        lines.append(header)
        for r in group:
            bad = r.problems
            lines.append(f"  {r.job.dtype:<10}{r.job.describe_config():<20}{_n(r.regs):>5}{_n(r.smem):>9}"
                         f"{_n(r.spill):>8}  {r.tensor_cores:<13}{'FAIL' if bad else 'ok':<5}{r.job.describe_flags()}"
                         + ("".join(f"\n      -> {p}" for p in bad)))
    return "\n".join(lines)


def _n(x) -> str:
    return "?" if x is None else str(x)


# ------------------------------------------------------------------------------------------------ arches

def can_target(arch: int) -> bool:
    """Whether the installed Triton compiles for sm_<arch> (a tiny kernel through ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels.fused_forward import _combine_kernel
    try:
        sig = {n: "constexpr" if n in ("WITH_ENTROPY", "BLOCK_M") else _arg_type(n, "fp32")
               for n in _combine_kernel.arg_names}
        triton.compile(ASTSource(_combine_kernel, sig, dict(WITH_ENTROPY=False, BLOCK_M=16)),
                       target=GPUTarget("cuda", arch, 32), options=dict(num_warps=1, enable_fp_fusion=True))
        return True
    except Exception:
        return False


def default_archs() -> list[int]:
    try:
        import torch
        if torch.cuda.is_available():
            found = sorted({p[0] * 10 + p[1] for p in (torch.cuda.get_device_capability(i)
                                                         for i in range(torch.cuda.device_count()))})
            if found:
                return found
    except Exception:
        pass
    return list(BASE_ARCHS) + ([100] if can_target(100) else [])


def parse_archs(text: str) -> list[int]:
    archs = []
    for part in text.split(","):
        part = part.strip().lower().removeprefix("sm_").removeprefix("sm")
        if not part:
            continue
        if not part.isdigit() or not 50 <= int(part) <= 200:
            raise argparse.ArgumentTypeError(f"--arch: {part!r} is not an SM version such as 80, 86, 89, 90")
        archs.append(int(part))
    if not archs:
        raise argparse.ArgumentTypeError("--arch: no architecture given")
    return archs


# ------------------------------------------------------------------------------------------------ main

def run(archs: list[int], all_combinations: bool = False, jobs: int | None = None, echo=print) -> list[Result]:
    todo = [j for a in archs for j in jobs_for(a, all_combinations)]
    workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    echo(f"compile_check: {len(todo)} compiles for sm_{', sm_'.join(map(str, archs))} on {workers} process(es)",
         flush=True)
    if workers == 1:
        results = [compile_job(j) for j in todo]
    else:  # fork: the workers inherit the imported triton (no CUDA is ever initialised here)
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(compile_job, todo))
    for r in results:
        r.problems = judge(r)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m grpo_kernels.compile_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=parse_archs, default=None,
                   help="comma list of SM versions, e.g. 80,86,89,90 (default: the visible GPUs', else 80,86,89,90 "
                        "and 100 when this Triton can target it)")
    p.add_argument("--all", action="store_true", help="every flag combination the library can launch (slow)")
    p.add_argument("-j", "--jobs", type=int, default=None, help="parallel compiles (default: the CPU count)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if env_flags.triton_interpret():
        # triton.jit chose the interpreter at import: compile in a fresh process without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "grpo_kernels.compile_check", *(argv or sys.argv[1:])],
                              env=env).returncode
    t0 = time.monotonic()
    archs = args.arch or default_archs()
    results = run(archs, args.all, args.jobs)
    print(format_tables(results))
    failed = [r for r in results if r.problems]
    print(f"\n{len(results)} configurations compiled in {time.monotonic() - t0:.0f} s; "
          + (f"{len(failed)} FAILED" if failed else "all within limits"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(kernel=r.job.name, arch=r.job.arch, dtype=r.job.dtype, config=dict(r.job.config),
                            flags=dict(r.job.flags), regs=r.regs, smem=r.smem, spill=r.spill,
                            tensor_cores=r.tensor_cores, seconds=round(r.seconds, 2), error=r.error,
                            problems=r.problems) for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
