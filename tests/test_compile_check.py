"""grpo_kernels.compile_check without compiling: which configurations it lists per architecture (the per-device
tiles), how it judges a compiled result, its arguments and its exit status. The real compiles run in
test_kernels.py (test_every_kernel_configuration_compiles_within_each_architectures_limits)."""

import argparse

import pytest
import torch

from grpo_kernels import compile_check as cc
from grpo_kernels.kernels import configs


def _tile(job):
    c = dict(job.config)
    return c["BLOCK_M"], c["BLOCK_V"], c["BLOCK_K"], c["num_stages"]


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_each_arch_lists_the_tiles_it_launches(arch):
    jobs = cc.jobs_for(arch)
    names = {j.name for j in jobs}
    assert names == {"_chunk_stats_kernel", "_chunk_dlogits_kernel", "_fused_stats_kernel", "_combine_kernel",
                     "_fused_backward_kernel", "_token_loss_kernel"}
    bwd = [j for j in jobs if j.name == "_fused_backward_kernel"]
    assert {j.dtype for j in bwd} == {"bf16", "fp16", "fp32", "fp32-tf32"}
    assert {dict(j.flags)["WITH_ENTROPY_GRAD"] for j in bwd} == {False, True}
    cap = (arch // 10, arch % 10)
    for j in bwd:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(j.dtype, torch.float32)
        want = configs.fused_backward_configs(cap, configs.ARCH_SMEM[arch], dt, dict(j.flags)["WITH_ENTROPY_GRAD"])[0]
        assert dict(j.config) == want
    bf16 = {_tile(j) for j in bwd if j.dtype == "bf16"}
    assert bf16 == ({(128, 128, 64, 3), (128, 128, 64, 2)} if arch >= 90 else {(128, 128, 32, 2)})


def test_all_enumerates_every_launchable_flag_combination():
    every = [j for j in cc.jobs_for(90, all_combinations=True) if j.name == "_fused_backward_kernel"]
    # per dtype and entropy-gradient flag: bias off 3 (dH, dW, both), bias on 7 (those with and without dB, dB alone)
    assert len(every) == 4 * 2 * (3 + 7)
    assert all(dict(j.flags)["FILTER"] and not dict(j.flags)["COUNT_SKIPS"] for j in every)
    assert not any(dict(j.flags)["NEED_B"] and not dict(j.flags)["HAS_BIAS"] for j in every)
    assert len(cc.jobs_for(90, all_combinations=True)) > 3 * len(cc.jobs_for(90))


def _result(arch=90, dtype="bf16", smem=1000, spill=0, tc="HGMMA", gemm=True, error=""):
    job = cc.Job("fused_backward:_fused_backward_kernel", dtype, (("HAS_BIAS", True),),
                 (("BLOCK_M", 128), ("BLOCK_V", 128), ("BLOCK_K", 64), ("num_stages", 3), ("num_warps", 8)), arch, gemm)
    return cc.Result(job, regs=200, smem=smem, spill=spill, tensor_cores=tc, error=error)


def test_judge():
    assert cc.judge(_result()) == []
    assert "cannot launch" in cc.judge(_result(arch=86, smem=131072))[0]   # the finding: 128 KiB on a 99 KiB SM
    assert cc.judge(_result(arch=86, smem=101376)) == []
    assert "spills" in cc.judge(_result(spill=224))[0]
    assert cc.judge(_result(arch=80, spill=224)) == []                       # spills fail on sm_90 only
    assert "tensor-core" in cc.judge(_result(tc="-"))[0]
    assert cc.judge(_result(dtype="fp32", tc="-")) == []
    assert cc.judge(_result(tc="?")) == []                                   # no cuobjdump: not judged
    assert "compile failed" in cc.judge(_result(error="CompilationError: at 3:4"))[0]


def test_exit_status_and_table(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bad = {"_fused_backward_kernel"}

    def fake_compile(job):
        res = cc.Result(job, regs=100, smem=1024, spill=0, tensor_cores="HMMA" if job.gemm else "-")
        if job.name in bad and job.arch == 86 and job.dtype == "bf16":
            res.smem = 131072
        return res

    monkeypatch.setattr(cc, "compile_job", fake_compile)
    assert cc.main(["--arch", "86", "-j", "1"]) == 1
    out = capsys.readouterr().out
    assert "_fused_backward_kernel on sm_86 (shared memory per block: 101376 B)" in out
    assert "FAIL" in out and "cannot launch" in out and "FAILED" in out
    bad.clear()
    assert cc.main(["--arch", "86", "-j", "1"]) == 0
    assert "all within limits" in capsys.readouterr().out


def test_arch_argument():
    assert cc.parse_archs("80,86, sm_89,sm90") == [80, 86, 89, 90]
    for bad in ("", "ampere", "8.6", "3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--arch"):
            cc.parse_archs(bad)


def test_default_archs_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cc, "can_target", lambda arch: arch == 100)
    assert cc.default_archs() == [80, 86, 89, 90, 100]
    monkeypatch.setattr(cc, "can_target", lambda arch: False)
    assert cc.default_archs() == [80, 86, 89, 90]
