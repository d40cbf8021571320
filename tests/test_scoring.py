import asyncio
import functools
import math

import pytest
import torch

from grpo.rewards import format_reward, gsm8k_reward, math_reward
from grpo.scoring import (
    RewardModelFunction,
    is_conversational,
    resolve_reward_funcs,
    reward_func_name,
    reward_func_names,
    reward_metrics,
    score_completions,
)

NAN = float("nan")
PROMPTS = ["What is 2 + 3?", "What is 2 + 3?", "What is 10 - 4?", "What is 10 - 4?"]
COMPLETIONS = ["2 + 3 = 5\n#### 5", "#### 6", "10 - 4 = 6\n#### 6", "I am not sure"]
IDS = [[1, 2], [3], [4, 5, 6], [7]]
COLUMNS = {"answer": ["#### 5", "#### 5", "#### 6", "#### 6"], "level": [1, 1, 2, 2]}


def test_builtins_end_to_end_with_weights():
    per_func, total = score_completions(
        [gsm8k_reward, format_reward], PROMPTS, COMPLETIONS, IDS, COLUMNS, reward_weights=[1.0, 0.2]
    )
    assert per_func.dtype == torch.float32 and per_func.shape == (4, 2)
    assert per_func.tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    assert torch.allclose(total, torch.tensor([1.2, 0.2, 1.2, 0.0]))


def test_columns_and_trl_keywords_passed_through():
    seen = {}

    def spy(prompts, completions, completion_ids, answer, level, trainer_state, log_extra, log_metric, **kw):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                    level=level, trainer_state=trainer_state, extra=kw)
        log_extra("note", ["a"] * len(prompts))  # the no-op default must accept TRL's calls
        log_metric("my_metric", 1.0)
        return [0.5] * len(prompts)

    state = object()
    score_completions([spy], PROMPTS, COMPLETIONS, IDS, COLUMNS, None, trainer_state=state)
    assert seen["prompts"] == PROMPTS and seen["completions"] == COMPLETIONS and seen["completion_ids"] == IDS
    assert seen["answer"] == COLUMNS["answer"] and seen["level"] == [1, 1, 2, 2]
    assert seen["trainer_state"] is state and seen["extra"] == {}


def test_prompt_and_completion_columns_are_not_duplicated():
    def spy(prompts, completions, completion_ids, **kw):
        assert "prompt" not in kw and "completion" not in kw and completion_ids == IDS
        return [1.0] * len(prompts)

    cols = dict(COLUMNS, prompt=PROMPTS, completion=COMPLETIONS)
    per_func, _ = score_completions([spy], PROMPTS, COMPLETIONS, IDS, cols, None)
    assert per_func.sum() == 4


def test_chat_prompts_get_chat_completions():
    prompts = [[{"role": "user", "content": "2+3?"}]] * 2
    received = []

    def spy(prompts, completions, **kw):
        received.extend(completions)
        return [1.0, 0.0]

    score_completions([spy, gsm8k_reward], prompts, ["#### 5", "#### 4"], [[1], [2]], {"answer": ["5", "5"]}, None)
    assert received == [[{"role": "assistant", "content": "#### 5"}], [{"role": "assistant", "content": "#### 4"}]]
    assert is_conversational(prompts[0]) and not is_conversational("2+3?")


def test_none_rewards_and_nan_aware_total():
    def partial_a(prompts, completions, **kw):
        return [1.0, None, None, 0.5]

    def partial_b(prompts, completions, **kw):
        return [None, 2.0, None, 1.0]

    per_func, total = score_completions([partial_a, partial_b], PROMPTS, COMPLETIONS, IDS, COLUMNS, [2.0, 3.0])
    assert math.isnan(per_func[1, 0]) and math.isnan(per_func[0, 1])
    assert total[0] == 2.0 and total[1] == 6.0 and total[3] == 4.0
    assert math.isnan(total[2])  # every function returned None: not scorable


def test_numeric_types_accepted():
    import numpy as np

    funcs = [
        lambda prompts, **kw: torch.tensor([1.0, 2.0, 3.0, 4.0]),
        lambda prompts, **kw: np.array([1, 0, 1, 0]),
        lambda prompts, **kw: [np.float32(0.5), torch.tensor(1.5), 2, True * 0],
    ]
    per_func, _ = score_completions(funcs, PROMPTS, COMPLETIONS, IDS, COLUMNS, None)
    assert per_func[:, 0].tolist() == [1, 2, 3, 4] and per_func[:, 1].tolist() == [1, 0, 1, 0]
    assert per_func[:, 2].tolist() == [0.5, 1.5, 2.0, 0.0]


def test_async_functions_run_concurrently():
    events = []

    async def judge_a(prompts, completions, **kw):
        events.append("a start")
        await asyncio.sleep(0)  # hand control over: b must start before a finishes
        events.append("a end")
        return [1.0] * len(prompts)

    async def judge_b(prompts, completions, **kw):
        events.append("b start")
        await asyncio.sleep(0)
        events.append("b end")
        return [2.0] * len(prompts)

    def sync_c(prompts, completions, **kw):
        events.append("c")
        return [3.0] * len(prompts)

    per_func, total = score_completions([judge_a, sync_c, judge_b], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)
    assert per_func[0].tolist() == [1.0, 3.0, 2.0] and total[0] == 6.0  # columns in the given order
    assert events.index("a start") < events.index("b end") and events.index("b start") < events.index("a end")
    assert events[0] == "c"  # synchronous ones run first, as TRL


def test_async_functions_must_overlap_to_finish():
    # b waits for an event that only a sets: run one after the other, b would time out (and raise) instead.
    holder = {}

    async def a(prompts, **kw):
        holder.setdefault("ev", asyncio.Event()).set()
        return [1.0] * len(prompts)

    async def b(prompts, **kw):
        ev = holder.setdefault("ev", asyncio.Event())
        await asyncio.wait_for(ev.wait(), timeout=5)
        return [0.0] * len(prompts)

    per_func, _ = score_completions([b, a], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)
    assert per_func[:, 0].tolist() == [0.0] * 4 and per_func[:, 1].tolist() == [1.0] * 4


def test_async_works_inside_a_running_loop():
    async def judge(prompts, **kw):
        await asyncio.sleep(0)
        return [1.0] * len(prompts)

    async def main():
        return score_completions([judge], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)

    per_func, _ = asyncio.run(main())
    assert per_func.sum() == 4


def test_async_callable_class_and_partial():
    class Judge:
        async def __call__(self, prompts, completions, scale=1.0, **kw):
            return [scale] * len(prompts)

    judge = functools.partial(Judge(), scale=2.0)
    per_func, _ = score_completions([judge], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)
    assert per_func.sum() == 8.0
    assert reward_func_name(judge) == "Judge"


def test_failing_function_is_named():
    def broken_reward(prompts, completions, **kw):
        raise KeyError("answer")

    async def broken_async(prompts, completions, **kw):
        raise ZeroDivisionError("oops")

    with pytest.raises(RuntimeError, match=r"'broken_reward' raised KeyError"):
        score_completions([gsm8k_reward, broken_reward], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)
    with pytest.raises(RuntimeError, match=r"'broken_async' raised ZeroDivisionError: oops"):
        score_completions([broken_async], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)


def test_wrong_outputs_are_named():
    def short(prompts, **kw):
        return [1.0]

    def texty(prompts, **kw):
        return [1.0, "high", 0.0, 0.0]

    def infinite(prompts, **kw):
        return [1.0, 1.0, float("inf"), 0.0]

    def scalar(prompts, **kw):
        return 1.0

    with pytest.raises(ValueError, match=r"'short' returned 1 rewards for 4 completions"):
        score_completions([short], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)
    with pytest.raises(ValueError, match=r"'texty' returned 'high' at index 1"):
        score_completions([texty], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)
    with pytest.raises(ValueError, match=r"'infinite' returned inf at index 2"):
        score_completions([infinite], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)
    with pytest.raises(ValueError, match=r"'scalar' returned float"):
        score_completions([scalar], PROMPTS, COMPLETIONS, IDS, COLUMNS, None)


def test_argument_checks():
    with pytest.raises(ValueError, match=r"1 reward_weights for 2 reward functions \(gsm8k_reward, format_reward\)"):
        score_completions([gsm8k_reward, format_reward], PROMPTS, COMPLETIONS, IDS, COLUMNS, [1.0])
    with pytest.raises(ValueError, match=r"column 'answer' has 2 values for 4 completions"):
        score_completions([gsm8k_reward], PROMPTS, COMPLETIONS, IDS, {"answer": ["1", "2"]}, None)
    with pytest.raises(ValueError, match=r"3 completion_ids for 4 prompts"):
        score_completions([gsm8k_reward], PROMPTS, COMPLETIONS, IDS[:3], COLUMNS, None)


def test_resolve_names_and_callables():
    funcs = resolve_reward_funcs(["gsm8k", format_reward, "math"])
    assert funcs == [gsm8k_reward, format_reward, math_reward]
    assert resolve_reward_funcs(format_reward) == [format_reward]
    with pytest.raises(ValueError, match="did you mean 'gsm8k'"):
        resolve_reward_funcs("gsm8")
    with pytest.raises(TypeError, match="got int"):
        resolve_reward_funcs([3])
    with pytest.raises(ValueError, match="no reward functions"):
        resolve_reward_funcs([])
    with pytest.raises(ValueError, match="neither a registered name"):
        resolve_reward_funcs("/nonexistent/reward-model-dir")


def test_names_unique():
    assert reward_func_names([gsm8k_reward, format_reward, format_reward]) == [
        "gsm8k_reward", "format_reward", "format_reward_2"]


def test_reward_metrics():
    per_func = torch.tensor([[1.0, NAN], [0.0, 2.0], [1.0, 4.0]])
    m = reward_metrics(per_func, ["a", "b"])
    assert m["rewards/a/mean"] == pytest.approx(2 / 3) and m["rewards/b/mean"] == pytest.approx(3.0)
    assert m["rewards/b/std"] == pytest.approx(math.sqrt(2.0))


# --- reward model: a tiny randomly initialised sequence classifier, no downloads ----------------------------

@pytest.fixture(scope="module")
def tiny_reward_model():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789+-=?#: \n")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
    )
    model = transformers.LlamaForSequenceClassification(config)
    model.config._name_or_path = "someorg/tiny-rm"
    return model, tokenizer


def test_reward_model_scores_match_unbatched_logits(tiny_reward_model):
    model, tokenizer = tiny_reward_model
    (fn,) = resolve_reward_funcs(model, reward_processing_classes=tokenizer)
    assert isinstance(fn, RewardModelFunction) and reward_func_name(fn) == "tiny-rm"
    assert reward_func_name(model) == "tiny-rm"
    assert model.config.pad_token_id == tokenizer.pad_token_id  # padding set up for batching
    prompts = ["what is 2+3? ", "what is 10-4? ", "hi "]
    completions = ["#### 5", "the answer is 6\n#### 6", "a"]
    per_func, total = score_completions([fn], prompts, completions, [[1]] * 3, {}, None)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = tokenizer(p + c, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = model(**ids).logits[0, 0].item()
        assert per_func[i, 0].item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(per_func[:, 0], total)
    assert len(set(per_func[:, 0].tolist())) == 3  # really different inputs


def test_reward_model_with_chat_prompts(tiny_reward_model):
    model, tokenizer = tiny_reward_model
    fn = RewardModelFunction(model, tokenizer)
    prompts = [[{"role": "user", "content": "what is 2+3?"}]] * 2
    assert fn.texts(prompts, [[{"role": "assistant", "content": "5"}], "6"]) == [
        "user: what is 2+3?\nassistant: 5", "user: what is 2+3?\nassistant: 6"]
    per_func, _ = score_completions([fn, gsm8k_reward], prompts, ["#### 5", "#### 6"], [[1], [2]],
                                    {"answer": ["5", "5"]}, [0.5, 1.0])
    assert per_func[:, 1].tolist() == [1.0, 0.0] and not torch.isnan(per_func[:, 0]).any()


def test_reward_model_from_a_local_directory(tiny_reward_model, tmp_path):
    model, tokenizer = tiny_reward_model
    model.save_pretrained(tmp_path / "tiny-rm")
    tokenizer.save_pretrained(tmp_path / "tiny-rm")
    (fn,) = resolve_reward_funcs(str(tmp_path / "tiny-rm"))
    assert isinstance(fn, RewardModelFunction) and reward_func_name(fn) == "tiny-rm"
    direct = RewardModelFunction(model, tokenizer)(["hi "], ["a"])
    assert fn(["hi "], ["a"]) == pytest.approx(direct, abs=1e-5)  # same weights, same tokenizer
