"""Colocate generation: one in-process `vllm.LLM` per training process, fed the policy's own weights.

Built from the policy's config with `load_format="dummy"` (nothing is read from disk or downloaded), then every
weight is pushed from the live model (`vllm_weights.named_weights`). After each optimizer step and on resume the
trainer pushes again (`sync`), so the engine always samples from the current weights.

Weight push: the worker's `reload_weights(weights_iterator=...)` through `LLM.collective_rpc` (vLLM 0.32). It runs
the model's own `load_weights` (checkpoint names, fused q/k/v and gate/up, tensor-parallel sharding) layer by layer
and then the weights' post-processing (e.g. the CPU build's GEMM repacking). The iterator is a Python generator,
so the engine must run in this process: `VLLM_ENABLE_V1_MULTIPROCESSING=0` (several processes under torchrun:
`distributed_executor_backend="external_launcher"`, as TRL does). TRL 1.16's route,
`model_runner.model.load_weights`, fails on vLLM 0.32's CPU build.

Sampling returns token ids and the sampler's per-token log-probs with `logprobs_mode="processed_logprobs"`: after
temperature (and top-k/top-p/min-p), i.e. the distribution the tokens were drawn from, which the importance-sampling
correction compares with the trainer's. Each request carries a seed drawn from torch's global generator, which
the trainer seeds per rank and checkpoints: sampling is reproducible and a resumed run samples what the
uninterrupted one would have.

CPU build specifics handled here: the CPU worker replaces `torch.set_num_threads` with a no-op and re-seeds the
global RNGs while it starts (both restored after construction); OpenMP thread binding is off
(`VLLM_CPU_OMP_THREADS_BIND=nobind` unless set) so that training keeps its threads; the KV cache is sized from the
batch (unless `VLLM_CPU_KVCACHE_SPACE` is set) instead of a share of the machine's memory.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from . import checkpoint, vllm_weights
from .vllm_config import INSTALL_HINT, VLLMNotInstalledError


class SampledCompletions(list):
    """Completion token ids per prompt (a list, as `rollout.hf_generate` returns) plus `logprobs`: the sampler's
    log-prob of each of those tokens (a list of floats per completion, NaN where vLLM gave none)."""

    def __init__(self, ids: list[list[int]], logprobs: list[list[float]]):
        super().__init__(ids)
        self.logprobs = logprobs


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise VLLMNotInstalledError(f"use_vllm=True but vLLM cannot be imported ({exc}): {INSTALL_HINT}") from exc
    return vllm


def base_config(model):
    """The HF config of the policy (under peft: of its base model), with `architectures` filled in."""
    import copy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    if not getattr(config, "architectures", None):
        config.architectures = [type(base).__name__]
    if getattr(config, "tie_word_embeddings", False):  # the head gets its own copy: see vllm_weights.named_weights
        config.tie_word_embeddings = False
    if hasattr(config, "quantization_config"):  # a GGUF-loaded policy holds dequantized fp weights
        delattr(config, "quantization_config")
    return config


def check_architecture(config, model_impl: str) -> None:
    """An architecture vLLM has no implementation of stops here, naming it."""
    vllm = import_vllm()
    if model_impl == "transformers":  # vLLM's transformers backend takes most decoder-only models
        return
    supported = set(vllm.ModelRegistry.get_supported_archs())
    missing = [a for a in config.architectures if a not in supported]
    if missing:
        raise ValueError(f"vLLM {vllm.__version__} cannot load architecture {', '.join(missing)}: use --use_vllm "
                         "false (HF generate), or try vllm_model_impl='transformers'")


def kv_cache_bytes(config, num_seqs: int, max_len: int, dtype: torch.dtype) -> int:
    """KV cache for num_seqs sequences of max_len tokens (+10%, at least 16 MiB); 1 GiB if the config does not say."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return 2**30
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return max(16 * 2**20, int(1.1 * num_seqs * max_len * per_token))


class ColocateEngine:
    """vLLM in this process. `generate` has `rollout.hf_generate`'s signature; `sync(model)` pushes weights."""

    def __init__(self, model, args, info):
        vllm = import_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the weight iterator must reach the worker as is
        cpu = info.device.type == "cpu"
        if cpu:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self.args, self.info = args, info
        self.tp = args.vllm_tensor_parallel_size
        if info.world_size % self.tp != 0:
            raise ValueError(f"vllm_tensor_parallel_size={self.tp} must divide the number of processes "
                             f"({info.world_size})")
        self.tp_group = None
        if self.tp > 1:  # ranks [0..tp), [tp..2tp), ... share an engine, as in TRL
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(i, i + self.tp)) for i in range(0, info.world_size, self.tp)])
        config = base_config(model)
        check_architecture(config, args.vllm_model_impl)
        self.architecture = ", ".join(config.architectures)
        dtype = torch.bfloat16 if args.bf16 else next(model.parameters()).dtype
        max_len = args.vllm_max_model_length
        if max_len is None and args.max_prompt_length is not None:
            max_len = args.max_prompt_length + (args.max_completion_length or 256)
        self._dir = tempfile.TemporaryDirectory(prefix="grpo-vllm-")
        config.save_pretrained(self._dir.name)
        kwargs = dict(
            model=self._dir.name, skip_tokenizer_init=True, load_format="dummy", generation_config="vllm",
            dtype=dtype, seed=args.seed + info.rank // self.tp, max_model_len=max_len,
            tensor_parallel_size=self.tp, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            enable_sleep_mode=args.vllm_enable_sleep_mode, model_impl=args.vllm_model_impl,
            logprobs_mode="processed_logprobs",
        )
        if info.world_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if cpu:
            seqs = args.generation_batch_size // info.world_size * self.tp
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(config, seqs, max_len or config.max_position_embeddings,
                                                             dtype)
            kwargs["enforce_eager"] = True  # torch.compile of the model would add minutes to every start
        set_threads, threads, rng = torch.set_num_threads, torch.get_num_threads(), checkpoint.rng_state()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            checkpoint.set_rng_state(rng)
        self._asleep = False
        self.sync(model)
        self._probe()

    def _probe(self) -> None:
        """One token, so that a model vLLM builds but cannot run fails now, naming it."""
        from vllm import SamplingParams

        try:
            self.llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1, temperature=0.0,
                                                                           detokenize=False), use_tqdm=False)
        except Exception as exc:
            raise RuntimeError(f"vLLM could not run {self.architecture} ({type(exc).__name__}: {exc}); use "
                               "--use_vllm false (HF generate)") from exc

    # ------------------------------------------------------------------------------------------------------------
    def sync(self, model) -> float:
        """Push the policy's current weights into the engine; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.args.vllm_enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
            self._asleep = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": vllm_weights.named_weights(model)})
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def sampling_params(self, sampling: dict, max_new_tokens: int, eos_ids: list[int]) -> dict:
        """HF-style sampling options (`rollout.sampling_kwargs`) as vLLM SamplingParams fields."""
        base = {"n": 1, "max_tokens": max_new_tokens, "stop_token_ids": list(eos_ids), "logprobs": 0,
                "detokenize": False}
        if not sampling.get("do_sample", False):
            return {**base, "temperature": 0.0}
        return {**base, "temperature": sampling["temperature"], "top_p": sampling.get("top_p", 1.0),
                "top_k": sampling.get("top_k", 0), "min_p": sampling.get("min_p") or 0.0,
                "repetition_penalty": sampling.get("repetition_penalty", 1.0)}

    @torch.no_grad()
    def generate(self, model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                 sampling: dict, batch_size: int | None = None) -> SampledCompletions:
        """Completions (cut after the first EOS) and their sampler log-probs; vLLM batches by itself."""
        from vllm import SamplingParams

        params = self.sampling_params(sampling, max_new_tokens, eos_ids)
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()  # from the trainer's per-rank RNG
        requests = list(zip(prompt_ids, seeds))
        if self.tp_group is not None:  # every rank of the group generates the group's prompts with the same seeds
            gathered = [None] * self.tp
            torch.distributed.all_gather_object(gathered, requests, group=self.tp_group)
            requests = [r for part in gathered for r in part]
        if self.args.vllm_enable_sleep_mode:
            if self._asleep:  # a second rollout between two optimizer steps: the weights were released
                self.sync(model)
            self.llm.wake_up(tags=["kv_cache"])
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids, _ in requests],
                                    [SamplingParams(**params, seed=seed) for _, seed in requests], use_tqdm=False)
        if self.args.vllm_enable_sleep_mode:
            self.llm.sleep(level=2)  # weights come back with the next sync
            self._asleep = True
        if self.tp_group is not None:
            me = torch.distributed.get_rank(group=self.tp_group)
            outputs = outputs[me * len(prompt_ids) : (me + 1) * len(prompt_ids)]
        ids, logps = [], []
        for out in outputs:
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            lp = [float("nan") if d is None or t not in d else d[t].logprob
                  for t, d in zip(tokens, sample.logprobs or [None] * len(tokens))]
            cut = next((j for j, t in enumerate(tokens) if t in eos_ids), None)
            if cut is not None:
                tokens, lp = tokens[: cut + 1], lp[: cut + 1]
            ids.append(tokens)
            logps.append(lp)
        return SampledCompletions(ids, logps)

    def close(self) -> None:
        self.llm = None
        self._dir.cleanup()
