"""Per-device launch configurations (grpo_kernels/kernels/configs.py) and the fused backward's retry on Triton's
OutOfResources, on the CPU: the choice is a pure function of (capability, shared memory per block, dtype, flags).

Before, every device got the 16-bit 128 x 128 x 64, 3-stage backward tile: 131,072 B of shared memory on sm_86/89,
which allow 101,376 B per block, so the first launch raised OutOfResources there."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from conftest import rel_err

from grpo_kernels.kernels import configs, fused_backward
from grpo_kernels.kernels.configs import ARCH_SMEM, fused_backward_configs, smem_estimate

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("arch", sorted(ARCH_SMEM))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("eg", [False, True])
def test_every_candidate_fits_the_devices_shared_memory(arch, dtype, eg):
    cap = (arch // 10, arch % 10)
    cands = fused_backward_configs(cap, ARCH_SMEM[arch], dtype, eg)
    assert cands and all(smem_estimate(c, dtype) <= ARCH_SMEM[arch] for c in cands), cands
    assert all(c["BLOCK_M"] >= 16 and c["BLOCK_V"] >= 16 and c["BLOCK_K"] >= 16 for c in cands)
    sizes = [c["BLOCK_M"] * c["BLOCK_V"] * c["BLOCK_K"] * c["num_stages"] for c in cands]
    assert sizes == sorted(sizes, reverse=True)  # fallbacks only get smaller


def test_ampere_and_ada_get_the_small_16bit_tile_hopper_the_large_one():
    for cap in [(8, 0), (8, 6), (8, 9)]:
        first = fused_backward_configs(cap, ARCH_SMEM[cap[0] * 10 + cap[1]], torch.bfloat16, False)[0]
        assert (first["BLOCK_M"], first["BLOCK_V"], first["BLOCK_K"], first["num_stages"]) == (128, 128, 32, 2)
    h100 = fused_backward_configs((9, 0), ARCH_SMEM[90], torch.bfloat16, False)[0]
    assert (h100["BLOCK_K"], h100["num_stages"]) == (64, 3)
    assert fused_backward_configs((9, 0), ARCH_SMEM[90], torch.bfloat16, True)[0]["num_stages"] == 2
    # the 160 KiB tile never reaches a 99 KiB device, whatever its capability says (e.g. sm_120)
    assert all(smem_estimate(c, torch.bfloat16) <= 101376
               for c in fused_backward_configs((12, 0), 101376, torch.bfloat16, False))


def test_limits_prefer_what_torch_reports():
    assert configs.limits_of((8, 6)).smem_per_block == 101376
    assert configs.limits_of((8, 6), 65536).smem_per_block == 65536
    assert configs.limits_of((7, 5)).smem_per_block == 48 * 1024  # unknown: the portable 48 KiB


def test_smem_estimate_matches_the_sm90_compile():
    """Triton 3.9 for sm_90: 163,840 B for the bf16 128 x 128 x 64 3-stage tile, 131,072 B at 2 stages
    (compile_check prints these)."""
    cfg = dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_stages=3)
    assert smem_estimate(cfg, torch.bfloat16) == 163840
    assert smem_estimate(dict(cfg, num_stages=2), torch.bfloat16) == 131072


def _case(seed=5, m=37, h=16, v=50):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(m, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    targets = torch.randint(0, v, (m,), generator=g)
    z = hidden.double() @ weight.double().T
    lse = torch.logsumexp(z, 1)
    grad = torch.randn(m, generator=g)
    dz = -torch.softmax(z, 1) * grad.double()[:, None]
    dz[torch.arange(m), targets] += grad.double()
    return (hidden, weight, None, targets, lse.float(), grad, 1.0, True, True, False), dz.T @ hidden.double()


def test_backward_falls_back_to_the_next_config_on_out_of_resources(monkeypatch):
    big = dict(configs.INTERPRETER_GEMM, BLOCK_M=32)
    small = dict(configs.INTERPRETER_GEMM)
    monkeypatch.setattr(fused_backward, "_configs", lambda device, dtype, eg: [big, small])
    monkeypatch.setattr(fused_backward, "_chosen", {})
    launched = []
    real = fused_backward._launch

    def launch(cfg, m, v, args, flags):
        launched.append(cfg["BLOCK_M"])
        if cfg["BLOCK_M"] == 32:
            raise OutOfResources(131072, 101376, "shared memory")
        real(cfg, m, v, args, flags)

    monkeypatch.setattr(fused_backward, "_launch", launch)
    args, dw_exact = _case()
    _, dw, _ = fused_backward.fused_linear_backward(*args)
    assert launched == [32, 16] and rel_err(dw, dw_exact) < 1e-5
    fused_backward.fused_linear_backward(*args)  # the next call starts at the config that launched
    assert launched == [32, 16, 16]


def test_backward_raises_when_no_config_fits(monkeypatch):
    monkeypatch.setattr(fused_backward, "_chosen", {})

    def launch(cfg, m, v, args, flags):
        raise OutOfResources(131072, 101376, "shared memory")

    monkeypatch.setattr(fused_backward, "_launch", launch)
    with pytest.raises(OutOfResources):
        fused_backward.fused_linear_backward(*_case()[0])


def test_every_launch_passes_enable_fp_fusion():
    """Each Triton launch sets enable_fp_fusion (a compile option given as a launch keyword; Triton 3.6 and 3.9
    both parse launch keywords as options): unset, Triton 3.9 warns at each first compile and a later Triton may
    change the default, and with it the epilogues' rounding."""
    import re
    from pathlib import Path

    from grpo_kernels.kernels import _common

    assert _common.FP_FUSION == {"enable_fp_fusion": True}
    folder = Path(_common.__file__).parent
    launches = 0
    for path in folder.glob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"\b_\w+_kernel\[[^\]]+\]\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            assert "**FP_FUSION" in text[m.end():i], f"{path.name}: {text[m.start():m.end() + 60]}"
            launches += 1
    assert launches == 6  # chunk stats, chunk dlogits, fused stats, combine, fused backward, token loss
