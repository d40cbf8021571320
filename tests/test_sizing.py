"""Sizing (strategy and chunk rows), host-device syncs per call, the zero-advantage entropy pass and the
kernels' specialisation flags. GPU memory is simulated by patching what `grpo_kernels.sizing` reads, so the
rules are checked here on the CPU; test_gpu.py runs them for real."""

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oracle
from conftest import rel_err

import grpo_kernels as gk
from grpo_kernels import chunk_driver, plan, sizing

GIB = 1 << 30
CUDA0 = torch.device("cuda", 0)  # never touched: the memory queries below are patched


@pytest.fixture
def gpu_memory(monkeypatch):
    """Simulated device: set .avail (driver free + cache) and .total in bytes."""
    class Mem:
        avail = 40 * GIB
        total = 80 * GIB
    mem = Mem()
    monkeypatch.setattr(sizing, "available_bytes", lambda device: mem.avail)
    monkeypatch.setattr(sizing, "total_bytes", lambda device: mem.total)
    return mem


def test_available_counts_the_caching_allocators_unused_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 41 * GIB)
    assert sizing.available_bytes(CUDA0) == 12 * GIB


def _chunk_bytes(rows, V):
    return rows * V * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunk_budget_counts_fp32_buffer_and_dw_accumulator(gpu_memory, dtype):
    V, H, n = 128256, 4096, 65536
    gpu_memory.avail = 5 * GIB  # usable 4 GiB: 1.96 GiB accumulator (+ 0.98 GiB 16-bit cast) + the chunk
    usable = int(gpu_memory.avail * sizing.USABLE_FRACTION)
    acc = V * H * 4 + (V * H * 2 if dtype != torch.float32 else 0)  # fp32 accumulator and its final cast copy
    rows = sizing.default_chunk_size(n, V, H, dtype, CUDA0, weight_grad=True)
    assert sizing.CHUNK_FLOOR <= rows < n
    assert _chunk_bytes(rows, V) + acc <= usable           # fp32 buffer whatever the input dtype, + accumulator
    assert _chunk_bytes(rows, V) <= sizing.CHUNK_CAP_BYTES
    # without a weight gradient there is no accumulator: more rows fit (up to the cap)
    rows_frozen = sizing.default_chunk_size(n, V, H, dtype, CUDA0, weight_grad=False)
    assert rows_frozen > rows and _chunk_bytes(rows_frozen, V) <= min(usable, sizing.CHUNK_CAP_BYTES)
    # the buffer is fp32 for every input dtype; only the 16-bit weight's cast copy differs
    assert rows <= sizing.default_chunk_size(n, V, H, torch.float32, CUDA0, weight_grad=True)


def test_torch_epilogue_temporaries_count(gpu_memory):
    V, H, n = 151936, 4096, 65536
    gpu_memory.avail = 8 * GIB
    tri = sizing.default_chunk_size(n, V, H, torch.bfloat16, CUDA0, torch_epilogue=False)
    tor = sizing.default_chunk_size(n, V, H, torch.bfloat16, CUDA0, torch_epilogue=True)
    assert tor < tri
    assert tor * sizing.chunk_row_bytes(V, torch.bfloat16, True) <= sizing.CHUNK_CAP_BYTES
    assert sizing.chunk_row_bytes(V, torch.bfloat16, True) == V * 4 * 4  # buffer + 2 temporaries + fp32 upcast
    assert sizing.chunk_row_bytes(V, torch.float32, True) == V * 4 * 3


def test_one_chunk_when_everything_fits_and_balanced_chunks_otherwise(gpu_memory):
    V, H = 32000, 2048
    assert sizing.default_chunk_size(3001, V, H, torch.bfloat16, CUDA0) == 3001
    gpu_memory.avail = 2 * GIB
    n = 20000
    rows = sizing.default_chunk_size(n, V, H, torch.bfloat16, CUDA0)
    k = -(-n // rows)
    assert k >= 2 and n - (k - 1) * rows >= rows // 2, (rows, k)  # the last chunk is not a sliver


def test_floor_of_1024_rows_and_clear_error(gpu_memory):
    V, H = 128256, 4096
    gpu_memory.avail = int(4.2 * GIB)  # usable 3.36 GiB: accumulator + cast (2.94 GiB) + 1024 rows (0.49) do not fit
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"strategy='fused'.*") as info:
        sizing.default_chunk_size(50000, V, H, torch.bfloat16, CUDA0, weight_grad=True)
    assert "1024-row chunk" in str(info.value) and "dW accumulator" in str(info.value)
    # a frozen head needs no accumulator: 1024 rows fit
    assert sizing.default_chunk_size(50000, V, H, torch.bfloat16, CUDA0, weight_grad=False) >= 1024
    # fewer tokens than the floor: the floor is the token count
    assert sizing.default_chunk_size(700, V, H, torch.bfloat16, CUDA0, weight_grad=True) == 700
    # the floor holds however tight memory gets, down to the error (accumulator 1.96 GiB + its bf16 cast 0.98 GiB
    # + 1024 rows 0.49 GiB need a usable 3.43 GiB)
    for gib in (4.3, 6, 12, 40):
        gpu_memory.avail = int(gib * GIB)
        assert sizing.default_chunk_size(50000, V, H, torch.bfloat16, CUDA0, weight_grad=True) >= 1024, gib


def _strategy(strategy, n, V, H, dtype, device, weight_grad=True):
    """The strategy size_call picks (chunk_size given, so the chunk rows do not depend on free memory)."""
    return sizing.size_call("test", strategy, 1, n, V, H, dtype, device, torch_epilogue=False,
                            weight_grad=weight_grad).strategy


def test_auto_is_the_same_whatever_memory_is_free(gpu_memory):
    """The per-step variation of free memory in a training loop never flips the strategy."""
    cases = [(16384, 128256, 4096, True), (16384, 151936, 8192, True), (300, 32000, 512, False)]
    for n, V, H, wgrad in cases:
        picks = set()
        for gib in (0.5, 1, 3, 10, 70):
            gpu_memory.avail = int(gib * GIB)
            picks.add(_strategy("auto", n, V, H, torch.bfloat16, CUDA0, weight_grad=wgrad))
        assert picks == {"chunked"}, (n, V, H, picks)
    # the rule: chunked at its floor must fit in 1/8 of the device's total memory
    gpu_memory.total = 16 * GIB  # 2 GiB limit; a [152k, 4096] fp32 accumulator alone is 2.3 GiB
    assert _strategy("auto", 16384, 151936, 4096, torch.bfloat16, CUDA0, weight_grad=True) == "fused"
    assert _strategy("auto", 16384, 151936, 4096, torch.bfloat16, CUDA0, weight_grad=False) == "chunked"
    assert _strategy("chunked", 16384, 151936, 4096, torch.bfloat16, CUDA0) == "chunked"
    assert _strategy("auto", 16384, 151936, 4096, torch.bfloat16, torch.device("cpu")) == "chunked"


def test_fused_is_never_refused_for_chunk_memory(gpu_memory):
    gpu_memory.avail = 64 << 20
    s = sizing.size_call("t", "fused", None, 50000, 128256, 4096, torch.bfloat16, CUDA0, False, True)
    assert s.strategy == "fused"
    s = sizing.size_call("t", "chunked", 512, 50000, 128256, 4096, torch.bfloat16, CUDA0, False, True)
    assert s.chunk_size == 512 and "given" in s.reason


def test_debug_log_says_strategy_chunk_and_why(gpu_memory, caplog):
    gpu_memory.avail = 6 * GIB
    with caplog.at_level(logging.DEBUG, logger="grpo_kernels"):
        s = sizing.size_call("fused_linear_grpo_loss", "auto", None, 40000, 128256, 4096, torch.bfloat16, CUDA0,
                             False, True)
    msg = caplog.text
    assert f"strategy=chunked chunk_size={s.chunk_size}" in msg
    assert "1/8 of" in msg and "dW accumulator" in msg and "available" in msg


def test_env_var_turns_the_log_on():
    code = ("import torch, grpo_kernels as gk\n"
            "h = torch.randn(2, 5, 8); W = torch.randn(11, 8); y = torch.randint(0, 11, (2, 5))\n"
            "gk.fused_linear_grpo_loss(h, W, y, torch.ones(2, 5), torch.randn(2))\n")
    env = dict(os.environ, GRPO_KERNELS_DEBUG="1", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "fused_linear_grpo_loss: 10 rows" in out.stderr and "strategy=chunked chunk_size=10" in out.stderr


# ------------------------------------------------------------------------------------------- syncs per call

_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
             "aten.is_nonzero.default", "aten.equal.default", "aten.item.default", "aten.repeat_interleave.Tensor",
             "aten._unique2.default", "aten.unique_consecutive.default", "aten.unique_dim.default"}


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that would make the host wait for a CUDA device (reading values, data-dependent shapes)."""

    def __init__(self):
        super().__init__()
        self.hits = []
        self.host_tensors = []  # host-made tensors (CPU on a GPU machine too): reading them is no device sync
        self.paused = 0         # inside a Triton launch: the interpreter reads its CPU tensors, a GPU launch does not

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        flat = list(args) + list((kwargs or {}).values())
        if self.paused or any(a is t for a in flat for t in self.host_tensors):
            return func(*args, **(kwargs or {}))
        if name == "aten.lift_fresh.default":  # torch.tensor(python data): made on the host, read on the host
            out = func(*args, **(kwargs or {}))
            self.host_tensors.append(out)
            return out
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in flat if isinstance(a, (list, tuple)) for i in a)
        if name in _SYNC_OPS or bool_index:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def syncs(monkeypatch):
    """Counts of (the plan's one sync, any other sync) while a block runs."""
    class Count:
        plan = 0
        other = []
    c = Count()
    inside = [False]
    real_to_host = plan._to_host

    def to_host(t):
        c.plan += 1
        inside[0] = True
        try:
            return real_to_host(t)
        finally:
            inside[0] = False

    def reading(method):
        real = getattr(torch.Tensor, method)

        def call(self, *a, **k):
            if not inside[0]:
                c.other.append(f"Tensor.{method}")
            return real(self, *a, **k)
        return call

    monkeypatch.setattr(plan, "_to_host", to_host)
    for m in ("tolist", "item"):
        monkeypatch.setattr(torch.Tensor, m, reading(m))
    mode = _SyncCounter()
    try:
        from triton.runtime import interpreter
    except ImportError:
        interpreter = None
    if interpreter is not None:
        launch = interpreter.GridExecutor.__call__

        def paused_launch(self, *a, **k):
            mode.paused += 1
            inside[0] = True
            try:
                return launch(self, *a, **k)
            finally:
                mode.paused -= 1
                inside[0] = False
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", paused_launch)

    class Run:
        host_tensors = mode.host_tensors

        def __enter__(self):
            mode.__enter__()
            return c

        def __exit__(self, *exc):
            mode.__exit__(*exc)
            c.other += [h for h in mode.hits]
            mode.hits = []
    return Run()


def test_sync_counter_sees_syncs(syncs):
    """The counter itself: the reads that used to be in the plan are all caught."""
    t = torch.randn(6)
    with syncs as c:
        int(t.sum() > 0)
        _ = t[t > 0]
        t.nonzero()
        t.tolist()
        float(t.max())
        float(torch.tensor(3.0))  # made on the host from a Python number: a host read even on a GPU machine
    assert len(c.other) == 5, c.other


@pytest.mark.parametrize("lt,lv,extra", [
    ("dapo", "token", dict(num_items_in_batch="tensor", compute_entropy=True)),
    ("grpo", "sequence", dict(beta=0.04, ref="given")),
    ("vespo", "token", dict(vllm=True)),
    ("sapo", "token", dict(compute_entropy=True, beta=0.1, ref="given")),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_sync_per_loss_call_none_per_chunk(syncs, lt, lv, extra, backend):
    extra = dict(extra)
    num_items = extra.pop("num_items_in_batch", None)
    p = oracle.make_problem(B=5, T=9, H=16, V=37, seed=11, bias=True, ref=extra.pop("ref", None),
                            vllm=extra.pop("vllm", False))
    if num_items == "tensor":
        # read on the host because it is a CPU tensor here; a CUDA one stays on the device (test_gpu checks that)
        p["num_items_in_batch"] = p["attention_mask"].sum() + 3
        syncs.host_tensors.append(p["num_items_in_batch"])
    h = p["hidden"].clone().requires_grad_(True)
    W = p["weight"].clone().requires_grad_(True)
    args = dict(p, hidden=h, weight=W)
    for chunk in (4, None):  # many chunks, then one
        with syncs as c:
            loss, metrics = gk.fused_linear_grpo_loss(**args, loss_type=lt, importance_sampling_level=lv,
                                                      chunk_size=chunk, backend=backend, strategy="chunked",
                                                      validate=True, **extra)
            loss.backward()
        assert c.plan == 1 and c.other == [], (chunk, c.plan, c.other)
        c.plan = 0
    with syncs as c:
        loss, _ = gk.fused_linear_grpo_loss(**args, loss_type=lt, importance_sampling_level=lv, strategy="fused",
                                            backend=backend, **extra)
        loss.backward()
    assert c.plan == 1 and c.other == [], (c.plan, c.other)


def test_syncs_of_linear_logprobs_and_grpo_loss(syncs):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 7, 12, generator=g, requires_grad=True)
    W = torch.randn(29, 12, generator=g, requires_grad=True)
    y = torch.randint(0, 29, (3, 7), generator=g)
    with syncs as c:
        gk.linear_logprobs(h, W, y, validate=False, chunk_size=5).sum().backward()
    assert c.plan == 0 and c.other == []
    with syncs as c:  # validation: exactly one read (the count of out-of-range targets)
        gk.linear_logprobs(h, W, y, validate=True, chunk_size=5).sum().backward()
    assert c.plan == 0 and c.other == ["aten._local_scalar_dense.default"]
    c.other = []
    logp = torch.randn(3, 7, generator=g).neg().requires_grad_(True)
    with syncs as c:
        loss, _ = gk.grpo_loss(logp, torch.ones(3, 7), torch.randn(3, generator=g), loss_type="vespo",
                               num_items_in_batch=torch.tensor(17.0))
        loss.backward()
    assert c.plan == 1 and c.other == []


def test_indices_match_nonzero():
    g = torch.Generator().manual_seed(0)
    for n, p in [(0, 0.5), (1, 1.0), (1, 0.0), (17, 0.3), (64, 1.0), (64, 0.0), (1000, 0.05)]:
        flag = torch.rand(n, generator=g) < p
        expect = flag.nonzero().squeeze(1)
        got = plan._indices(flag, int(flag.sum()))
        assert torch.equal(got, expect), (n, p)


def test_num_items_tensor_equals_number():
    p = oracle.make_problem(B=3, T=6, H=8, V=13, seed=2)
    a, _ = gk.fused_linear_grpo_loss(**p, loss_type="dapo", num_items_in_batch=torch.tensor(23.0))
    b, _ = gk.fused_linear_grpo_loss(**p, loss_type="dapo", num_items_in_batch=23)
    e, _, _ = oracle.oracle_run(dict(p, num_items_in_batch=23), loss_type="dapo")
    assert rel_err(a, e) < 1e-5 and rel_err(a, b) == 0.0
    with pytest.raises(TypeError, match="num_items_in_batch"):
        gk.fused_linear_grpo_loss(**p, num_items_in_batch=torch.tensor(True))


# --------------------------------------------------------------------------------- zero-advantage entropy pass

def _gemm_rows(monkeypatch):
    rows = []
    real = chunk_driver.chunk_logits

    def logits(h, weight, bias):
        rows.append(h.shape[0])
        return real(h, weight, bias)
    monkeypatch.setattr(chunk_driver, "chunk_logits", logits)
    return rows


def test_zero_advantage_entropy_pass_uses_full_chunks(monkeypatch):
    """All advantages 0 (beta 0): only the skipped rows' entropy pass runs; it must not go one row per GEMM."""
    p = oracle.make_problem(B=8, T=40, H=24, V=300, seed=9, mask="full")
    rows = _gemm_rows(monkeypatch)
    _, m_active = gk.fused_linear_grpo_loss(**p, compute_entropy=True, backend="torch")
    active = list(rows)
    rows.clear()
    _, m_zero = gk.fused_linear_grpo_loss(**dict(p, advantages=torch.zeros(8)), compute_entropy=True,
                                          backend="torch")
    zero = list(rows)
    assert sum(zero) == sum(active) == 8 * 40
    assert len(zero) <= len(active) and min(zero) >= min(active), (zero, active)
    assert rel_err(m_zero.entropy, m_active.entropy) < 1e-6  # same tokens, same entropy


# ------------------------------------------------------------------------------------------ specialisation

def _no_specialize(kernel):
    kw = getattr(kernel, "kwargs", None)  # the interpreter keeps the decorator's arguments here
    names = kw.get("do_not_specialize") if kw is not None else kernel.do_not_specialize
    return set(names or ())


@pytest.mark.parametrize("module,kernel,names", [
    ("chunk_epilogue", "_chunk_stats_kernel", {"M"}),
    ("chunk_epilogue", "_chunk_dlogits_kernel", {"M"}),
    ("fused_forward", "_fused_stats_kernel", {"M", "num_m_blocks", "tiles_per_split", "plane"}),
    ("fused_forward", "_combine_kernel", {"M", "n_splits", "plane"}),
    ("fused_backward", "_fused_backward_kernel", {"M", "num_m_blocks"}),
    ("token_loss", "_token_loss_kernel", {"M"}),
])
def test_per_call_sizes_are_not_specialised(module, kernel, names):
    """Token counts change every step: Triton must not compile a variant per value (== 1, divisible by 16)."""
    import importlib
    mod = importlib.import_module(f"grpo_kernels.kernels.{module}")
    assert names <= _no_specialize(getattr(mod, kernel))


# ------------------------------------------------------------- issue 15: fragmentation, missed buffers, OOM retry

def test_available_excludes_inactive_split_blocks(monkeypatch):
    """reserved - allocated counts the free pieces of partly used segments; the chunk needs one contiguous block,
    so those pieces are not available for it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 41 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"inactive_split_bytes.all.current": 7 * GIB})
    assert sizing.available_bytes(CUDA0) == 5 * GIB
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"inactive_split_bytes.all.current": 20 * GIB})
    assert sizing.available_bytes(CUDA0) == 3 * GIB  # never below what the driver has free


def test_single_chunk_counts_its_dw_and_d_hidden(gpu_memory):
    """One chunk writes dW [V, H] in the weight's dtype beside the buffer, and d_hidden [N, H] exists throughout:
    a call whose buffer alone fits but not with them gets chunks."""
    V, H, n = 32000, 4096, 8192
    buf = _chunk_bytes(n, V)  # 0.98 GiB
    dw = V * H * 2            # 0.24 GiB in bf16
    dh = n * H * 2            # 0.06 GiB
    gpu_memory.avail = int((buf + dw // 2) / sizing.USABLE_FRACTION)
    assert sizing.default_chunk_size(n, V, H, torch.bfloat16, CUDA0, weight_grad=False) == n
    assert sizing.default_chunk_size(n, V, H, torch.bfloat16, CUDA0, weight_grad=True) < n
    gpu_memory.avail = int((buf + dw + dh // 2) / sizing.USABLE_FRACTION)
    assert sizing.default_chunk_size(n, V, H, torch.bfloat16, CUDA0, weight_grad=True) == n
    assert sizing.default_chunk_size(n, V, H, torch.bfloat16, CUDA0, weight_grad=True, hidden_grad_rows=n) < n


def test_accumulator_counts_the_final_cast_copy():
    V, H = 1000, 64
    assert sizing.accumulator_bytes(V, H, torch.bfloat16, True) == V * H * (4 + 2)
    assert sizing.accumulator_bytes(V, H, torch.float32, True) == V * H * 4  # fp32: .to(fp32) copies nothing
    assert sizing.accumulator_bytes(V, H, torch.bfloat16, False) == 0


def test_chunk_buffer_rows_are_counted_at_their_aligned_stride():
    assert sizing.chunk_row_bytes(1001, torch.bfloat16, False) == 1008 * 4
    assert sizing.chunk_row_bytes(50257, torch.float32, False) == 50272 * 4


class _FakeOOM:
    """Patches chunk_driver.chunk_logits to raise OutOfMemoryError for chunks of more than `limit` rows, as a
    colocated process that took memory after sizing would."""

    def __init__(self, monkeypatch, limit):
        self.limit, self.rows = limit, []
        real = chunk_driver.chunk_logits

        def logits(h, w, b):
            self.rows.append(h.shape[0])
            if h.shape[0] > self.limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory (fake, {h.shape[0]} rows)")
            return real(h, w, b)

        monkeypatch.setattr(chunk_driver, "chunk_logits", logits)


def _big_problem(seed=51):
    # 4 x 700 = 2800 active tokens, tiny head: the CPU sizing puts all rows in one chunk
    p = oracle.make_problem(B=4, T=700, H=8, V=16, seed=seed, mask="full", ref="given")
    return p


@pytest.mark.parametrize("fn", ["loss", "logprobs", "ref_model"])
def test_first_chunk_oom_halves_the_chunk_and_retries(monkeypatch, fn):
    p = _big_problem()
    if fn == "ref_model":
        p = oracle.make_problem(B=4, T=700, H=8, V=16, seed=52, mask="full", ref="model")
    opts = dict(loss_type="dapo", beta=0.04, backend="torch", strategy="chunked")

    def run(chunk_size=None):
        if fn == "logprobs":
            h = p["hidden"].clone().requires_grad_(True)
            lp = gk.linear_logprobs(h, p["weight"], p["selected_token_ids"], chunk_size=chunk_size)
            lp.sum().backward()
            return lp.detach(), h.grad
        h = p["hidden"].clone().requires_grad_(True)
        loss, _ = gk.fused_linear_grpo_loss(**dict(p, hidden=h), **opts, chunk_size=chunk_size)
        loss.backward()
        return loss.detach(), h.grad

    want = run(chunk_size=700)
    fake = _FakeOOM(monkeypatch, limit=1400)
    got = run()
    assert fake.rows[0] == 2800 and 1400 in fake.rows and max(fake.rows[1:]) <= 1400
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


def test_first_chunk_oom_at_the_floor_raises_the_clear_error(monkeypatch):
    fake = _FakeOOM(monkeypatch, limit=100)
    p = _big_problem()
    with pytest.raises(torch.OutOfMemoryError, match=r"first chunk of 1024 token rows.*strategy='fused'") as e:
        gk.fused_linear_grpo_loss(**p, backend="torch", strategy="chunked")
    assert fake.rows == [2800, 1400, 1024] and "halved from 2800" in str(e.value)


def test_no_retry_for_a_given_chunk_size_or_a_later_chunk(monkeypatch):
    p = _big_problem()
    real = chunk_driver.chunk_logits
    fake = _FakeOOM(monkeypatch, limit=100)
    with pytest.raises(torch.OutOfMemoryError, match="first chunk of 2000"):
        gk.fused_linear_grpo_loss(**p, backend="torch", strategy="chunked", chunk_size=2000)
    assert fake.rows == [2000]
    # an OOM after the first chunk went through: memory that fit was taken away; halving would not help
    calls = []

    def second_fails(h, w, b):
        calls.append(h.shape[0])
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake, second chunk)")
        return real(h, w, b)

    monkeypatch.setattr(chunk_driver, "chunk_logits", second_fails)
    with pytest.raises(torch.OutOfMemoryError, match="second chunk"):
        gk.fused_linear_grpo_loss(**p, backend="torch", strategy="chunked", chunk_size=1500)
    assert calls == [1500, 1300]
