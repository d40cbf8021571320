"""Stage 1 of the loop: pick prompts, sample completions, pack them into padded tensors.

- `PromptSampler`: TRL's RepeatSampler order. Each epoch is a seeded permutation of the dataset cut into
  generation batches of `generation_batch_size / num_generations` distinct prompts (an incomplete tail is dropped);
  every prompt is repeated `num_generations` times back to back, so groups are consecutive. All ranks compute the
  same order; rank r keeps its contiguous slice of the repeated list.
- `generate_rollout`: tokenizes the prompts (chat template for conversational ones), samples with HF `generate`
  (KV cache, left padding, one batched call), cuts each completion after its first EOS and records truncation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import shared_prompts
from .data import is_conversational
from .sampler import split_sampling


# ----------------------------------------------------------------------------------------------------------------
# Prompt order
# ----------------------------------------------------------------------------------------------------------------
class PromptSampler:
    """Yields generation batches of dataset row indices; its position is two integers, so resuming is exact."""

    def __init__(self, num_rows: int, prompts_per_batch: int, num_generations: int, seed: int, shuffle: bool = True):
        if prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch must be >= 1, got {prompts_per_batch}")
        if num_rows < prompts_per_batch:
            raise ValueError(
                f"the training set has {num_rows} prompts but one generation batch needs {prompts_per_batch} "
                "distinct prompts (generation_batch_size / num_generations): add data or shrink the batch"
            )
        self.num_rows, self.prompts_per_batch = num_rows, prompts_per_batch
        self.num_generations, self.seed, self.shuffle = num_generations, seed, shuffle
        self.epoch, self.batch_in_epoch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.prompts_per_batch

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        g = torch.Generator().manual_seed(self.seed + epoch)  # a fresh permutation per epoch, recomputable on resume
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """Row indices of the next generation batch, each repeated num_generations times (groups consecutive)."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        start = self.batch_in_epoch * self.prompts_per_batch
        rows = self._order(self.epoch)[start : start + self.prompts_per_batch]
        self.batch_in_epoch += 1
        return [i for i in rows for _ in range(self.num_generations)]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.batch_in_epoch / max(1, self.batches_per_epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(
                f"the checkpoint's sampler walked a dataset of {state['num_rows']} prompts, this one has "
                f"{self.num_rows}: resume with the same training set"
            )
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]


def rank_slice(items: list, rank: int, world_size: int) -> list:
    """Rank r's contiguous share of a global list (the length must divide evenly)."""
    if len(items) % world_size != 0:
        raise ValueError(f"{len(items)} items cannot be split evenly across {world_size} processes")
    n = len(items) // world_size
    return items[rank * n : (rank + 1) * n]


# ----------------------------------------------------------------------------------------------------------------
# Tokenization and generation
# ----------------------------------------------------------------------------------------------------------------
def prompt_text(tokenizer, prompt: Any) -> str:
    """The text the model sees: the chat template with the generation prompt for conversations, else the string."""
    if is_conversational(prompt):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    return prompt


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int | None = None,
                     truncated: list[bool] | None = None) -> list[list[int]]:
    """Token ids per prompt; longer than max_prompt_length keeps the last tokens (the question's end).
    `truncated`, when given, receives one flag per prompt: whether it was cut."""
    ids = []
    for p in prompts:
        if is_conversational(p):  # the template already holds any BOS it wants
            tokens = tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
        else:
            tokens = tokenizer(prompt_text(tokenizer, p))["input_ids"]
        cut = max_prompt_length is not None and len(tokens) > max_prompt_length
        if cut:
            tokens = tokens[-max_prompt_length:]
        if truncated is not None:
            truncated.append(cut)
        ids.append(list(tokens))
    return ids


def truncation_warning(step: int, cut: torch.Tensor, max_prompt_length: int) -> str:
    """The one warning a run gives when prompts start being cut (prompts/truncated_fraction counts them)."""
    return (f"[grpo] warning: step {step}: {int(cut.sum())} of {cut.numel()} prompts are longer than "
            f"max_prompt_length={max_prompt_length} tokens and lose their beginning (e.g. a system message or "
            "role tag); raise max_prompt_length or shorten them (metric prompts/truncated_fraction)")


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every EOS id the model declares (e.g. an end-of-turn token) plus the tokenizer's, as TRL does."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token")
    return ids


def sampling_kwargs(args, temperature: float | None = None) -> dict:
    """generate() sampling options from the config; temperature 0 means greedy decoding."""
    temperature = args.temperature if temperature is None else temperature
    if temperature == 0:
        return {"do_sample": False}
    kwargs = {"do_sample": True, "temperature": temperature, "top_p": args.top_p, "top_k": args.top_k,
              "repetition_penalty": args.repetition_penalty}
    if args.min_p is not None:
        kwargs["min_p"] = args.min_p
    return kwargs


def pad(seqs: list[list[int]], value: int, side: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) for lists of token ids padded on `side` to the longest one (at least one column)."""
    width = max(1, max((len(s) for s in seqs), default=0))
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def hf_generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                sampling: dict, batch_size: int | None = None) -> list[list[int]]:
    """Completion token ids per prompt: HF generate (KV cache) on left-padded batches, cut after the first EOS.
    Plain temperature sampling draws by inverse CDF (`sampler.py`) instead of HF's multinomial."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    sampling, processors = split_sampling(sampling)
    out: list[list[int]] = []
    step = batch_size or len(prompt_ids)
    for start in range(0, len(prompt_ids), step):
        ids, mask = pad(prompt_ids[start : start + step], tokenizer.pad_token_id, "left", device)
        # A fresh GenerationConfig: the model's own sampling defaults (some ship temperature=0.2) must not leak in.
        config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  use_cache=True, disable_compile=True, **sampling)
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                   logits_processor=LogitsProcessorList(processors),
                                   **_shared_prompt_cache(model, ids, mask))
        for row in generated[:, ids.shape[1]:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos_ids), None)
            out.append(row if cut is None else row[: cut + 1])
    return out


def _shared_prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """generate() keyword arguments that hand it the KV cache of every prompt but its last token, each distinct
    prompt prefilled once (a group's num_generations rows share it; `shared_prompts.py`); {} when nothing repeats.
    generate() then runs only the last prompt column and samples exactly as without the cache."""
    name = shared_prompts.cache_kwarg(model.prepare_inputs_for_generation)
    if name is None or ids.shape[1] < 2 or not mask[:, :-1].any(1).all():  # a 1-token prompt has nothing to cache
        return {}
    try:
        decoder = shared_prompts.backbone(model)
    except TypeError:  # no separable decoder: generate() prefills every row itself
        return {}
    shared = shared_prompts.shared_prefill(decoder, ids[:, :-1], mask[:, :-1])
    return {} if shared is None else {name: shared[0]}


# ----------------------------------------------------------------------------------------------------------------
# The rollout batch
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One process's share of a generation batch. Tensors are [B, ...] on the training device."""

    rows: list[dict]  # the dataset rows (reward functions see their columns)
    prompts: list  # raw prompts (strings or message lists)
    completions: list  # decoded completions (string, or [{"role": "assistant", ...}] for conversations)
    completion_id_lists: list[list[int]]  # unpadded, up to and including the first EOS
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor  # 1 up to and including the first EOS; 0 for truncated ones when masked
    is_truncated: torch.Tensor  # bool: no EOS within max_completion_length
    advantages: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    sampling_logps: torch.Tensor | None = None  # the sampler's log-probs of the completion tokens (vLLM)
    importance_sampling_ratio: torch.Tensor | None = None  # π_old/π_vLLM, [B, C] or [B, 1] (vllm_importance.py)
    num_items_in_batch: float = 0.0  # completion tokens of the whole generation batch, all ranks
    extra: dict = field(default_factory=dict)  # per-completion logging (rewards, advantages)
    is_prompt_truncated: torch.Tensor | None = None  # bool: the prompt was cut to max_prompt_length

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: list[int]) -> Rollout:
        """A sub-batch (micro-batch), trimmed of padding columns that none of its rows uses."""
        idx = torch.tensor(index, dtype=torch.long, device=self.prompt_ids.device)
        pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
        out = Rollout(
            rows=[self.rows[i] for i in index], prompts=[self.prompts[i] for i in index],
            completions=[self.completions[i] for i in index],
            completion_id_lists=[self.completion_id_lists[i] for i in index],
            prompt_ids=pick(self.prompt_ids), prompt_mask=pick(self.prompt_mask),
            completion_ids=pick(self.completion_ids), completion_mask=pick(self.completion_mask),
            is_truncated=pick(self.is_truncated), advantages=pick(self.advantages), old_logps=pick(self.old_logps),
            ref_logps=pick(self.ref_logps), sampling_logps=pick(self.sampling_logps),
            importance_sampling_ratio=pick(self.importance_sampling_ratio), num_items_in_batch=self.num_items_in_batch,
        )
        return out.trimmed()

    def trimmed(self) -> Rollout:
        """Drop leading prompt columns and trailing completion columns that are padding in every row.

        Exact: positions come from the attention mask, masked tokens carry no loss, and dr_grpo normalizes by the
        constant max_completion_length rather than the tensor width."""
        p_used = self.prompt_mask.any(0).nonzero()
        p0 = int(p_used[0]) if len(p_used) else self.prompt_mask.shape[1] - 1
        lengths = torch.tensor([len(c) for c in self.completion_id_lists])
        c1 = max(1, int(lengths.max()) if len(lengths) else 1)
        self.prompt_ids, self.prompt_mask = self.prompt_ids[:, p0:], self.prompt_mask[:, p0:]
        for name in ("completion_ids", "completion_mask", "old_logps", "ref_logps", "sampling_logps",
                     "importance_sampling_ratio"):  # a [B, 1] sequence-level ratio keeps its one column
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[:, :c1])
        return self

    def split(self, num_chunks: int, generator: torch.Generator | None = None) -> list[Rollout]:
        """Shuffle (as TRL does before splitting) and cut into num_chunks equal micro-batches."""
        n = len(self)
        if n % num_chunks != 0:
            raise ValueError(f"a rollout of {n} completions cannot be split into {num_chunks} equal micro-batches")
        order = torch.randperm(n, generator=generator).tolist()
        size = n // num_chunks
        return [self.select(order[i * size : (i + 1) * size]) for i in range(num_chunks)]

    def to_state(self) -> dict:
        """Plain objects for torch.save (a checkpoint taken mid-rollout keeps it to resume exactly)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict, device) -> Rollout:
        obj = cls(**state)
        for f in fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, torch.Tensor):
                setattr(obj, f.name, v.to(device))
        return obj


def generate_rollout(model, tokenizer, rows: list[dict], args, generate_fn=hf_generate) -> Rollout:
    """Sample one completion per row (rows already repeated num_generations times) and pack the batch."""
    device = next(model.parameters()).device
    prompts = [r["prompt"] for r in rows]
    prompt_cut: list[bool] = []
    prompt_ids = tokenize_prompts(tokenizer, prompts, args.max_prompt_length, truncated=prompt_cut)
    eos_ids = eos_token_ids(model, tokenizer)
    max_new = args.max_completion_length or 256
    completion_lists = generate_fn(model, tokenizer, prompt_ids, max_new, eos_ids, sampling_kwargs(args))
    texts = tokenizer.batch_decode(completion_lists, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] if is_conversational(p) else t for p, t in zip(prompts, texts)]

    p_ids, p_mask = pad(prompt_ids, tokenizer.pad_token_id, "left", device)
    c_ids, c_mask = pad(completion_lists, tokenizer.pad_token_id, "right", device)
    # Truncated = no EOS at the end. A trailing pad token does not count as a terminator (TRL 1.16 counts it when
    # pad != EOS): generate() does not stop at it, so a completion ending in one was cut by the budget.
    truncated = torch.tensor([not c or c[-1] not in eos_ids for c in completion_lists], device=device)
    if args.mask_truncated_completions:
        c_mask = c_mask * (~truncated).unsqueeze(1).long()
    sampling_logps = None
    if getattr(completion_lists, "logprobs", None) is not None:  # a sampler that reports its log-probs (vLLM)
        sampling_logps = torch.zeros(c_ids.shape, dtype=torch.float32)
        for i, lp in enumerate(completion_lists.logprobs):
            sampling_logps[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        sampling_logps = sampling_logps.to(device)
    return Rollout(rows=rows, prompts=prompts, completions=completions, completion_id_lists=list(completion_lists),
                   prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                   is_truncated=truncated, sampling_logps=sampling_logps,
                   is_prompt_truncated=torch.tensor(prompt_cut, device=device))
