"""GRPOTrainer: the GRPO loop, readable top to bottom. Each stage lives in its own module:

    rollout.py     (1) sample prompts, generate completions           time/generation
    scoring.py +   (2) rewards, group-relative advantages             time/scoring
    advantages.py
    update.py      (3) old / reference log-probs  (4) loss + backward  time/update
    logger.py      (5) metrics.jsonl, progress bar, TensorBoard, completions.jsonl, reward_curve.png
    checkpoint.py  (6) atomic checkpoints and exact resume (run_lock.py: one run per output_dir;
                       signals.py: SIGTERM/SIGINT/SIGUSR1 save a checkpoint and stop)
    evaluate.py    (7) held-out accuracy
    distributed.py (8) several processes: gathers and gradient averaging
    callbacks.py   callbacks=[...]: transformers' TrainerCallback events plus phase events around (1)–(4)

Batch vocabulary (TRL's): a *generation batch* holds generation_batch_size completions on all ranks
(= generation_batch_size / num_generations prompts, each repeated num_generations times); each rank splits its
share into steps_per_generation micro-batches of per_device_train_batch_size completions; gradient_accumulation_steps
micro-batches make one optimizer step; a generation batch is reused for num_iterations passes.

Precision: weights load in fp32 (unless model_init_kwargs asks for another dtype) and AdamW updates them in place;
with bf16 (auto = on for CUDA with bf16) the backbone and generation run under torch.autocast(bfloat16) and the
fused loss sees bf16 hidden states and a bf16 view of the LM head. Prompts shared by a group run through the
backbone once (see update.completion_hidden).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from pathlib import Path

import torch

from . import checkpoint, distributed, fsdp, lora, rollout, run_lock, scoring, signals, update, vllm_importance
from . import data
from .callbacks import CallbackHandler
from . import evaluate as eval_lib
from . import model as model_lib
from .config import GRPOConfig
from .logger import MetricsLogger, plot_reward_curve


class GRPOTrainer:
    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, peft_config=None, callbacks=None):
        self.args = args = args if args is not None else GRPOConfig()
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a grpo.GRPOConfig, got {type(args).__name__}")
        self.dist = distributed.init_distributed(force_group=bool(args.fsdp))
        per_step = args.per_device_train_batch_size * self.dist.world_size
        if args.generation_batch_size != per_step * args.steps_per_generation:
            raise ValueError(
                f"the config was resolved for generation_batch_size={args.generation_batch_size} but this run has "
                f"{self.dist.world_size} processes × per_device_train_batch_size={args.per_device_train_batch_size} × "
                f"steps_per_generation={args.steps_per_generation}: build GRPOConfig after the process group's "
                "WORLD_SIZE is set (torchrun sets it)"
            )

        # Policy (fp32 master weights; LoRA adapters with peft_config), tokenizer, frozen reference copy when the
        # KL term is on (with LoRA the reference is the same model with its adapters disabled: no copy).
        self.model, self.tokenizer = self._load_policy(model, processing_class, peft_config)
        update.check_supported(self.model, args)
        self.ref_model = None
        if args.beta != 0.0 and peft_config is None:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # FSDP2 (fsdp="full_shard"): parameters become shards; every stage runs inside the root's forward (_run).
        self.fsdp_root = self.ref_root = None
        if args.fsdp:
            self.fsdp_root = fsdp.shard(self.model, self.dist, args.bf16)
            if self.ref_model is not None:
                self.ref_root = fsdp.shard(self.ref_model, self.dist, args.bf16)

        # Rewards.
        self.reward_funcs = scoring.resolve_reward_funcs(reward_funcs, reward_processing_classes, self.dist.device)
        self.reward_names = scoring.reward_func_names(self.reward_funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} values for {len(self.reward_funcs)} "
                             f"reward functions ({', '.join(self.reward_names)}): give one weight per function")

        # Data: TRL's RepeatSampler order, identical on every rank.
        if train_dataset is None:
            raise ValueError("train_dataset is required: a list of dicts (or a datasets.Dataset) with a 'prompt' "
                             "column")
        self.train_rows = self._as_rows(train_dataset, "train_dataset")
        self.eval_rows = self._as_rows(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.sampler = rollout.PromptSampler(len(self.train_rows), args.generation_batch_size // args.num_generations,
                                             args.num_generations, args.seed, args.shuffle_dataset)
        self.max_steps = self._total_steps()

        # Optimizer, schedule, fused loss.
        from transformers import get_scheduler

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() >= 2]  # no weight decay on biases and norm scales
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        )
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(args.warmup_ratio * self.max_steps),
                                       num_training_steps=self.max_steps)
        self.loss_fn = update.make_loss_fn(args)
        from transformers import TrainerState

        # callbacks=[...]: see callbacks.py; checked here, before any training.
        self.callback_handler = CallbackHandler(callbacks, args, TrainerState(max_steps=self.max_steps))

        self.step = 0  # optimizer steps done
        self.num_tokens = 0  # prompt + completion tokens generated so far, all ranks (TRL's num_tokens)
        self.buffer: list[rollout.Rollout] | None = None  # micro-batches of the current generation batch
        self.logger: MetricsLogger | None = None
        self._early_evals: list[tuple[int, dict]] = []
        self.last_eval: tuple[int, dict] | None = None  # (step, metrics) of the latest evaluate()
        self.generate_fn = rollout.hf_generate  # the sampler; tests may swap in a deterministic one
        self.stopped_by_signal: str | None = None  # set when a signal stopped train() early (after a checkpoint)
        self.unscorable = scoring.UnscorableWatch(args.max_unscorable_steps)
        self._said_prompts_cut = False
        self.vllm = None  # use_vllm: an in-process vLLM engine samples instead (docs/vllm.md)
        if args.use_vllm:
            from .vllm_engine import ColocateEngine

            self.vllm = ColocateEngine(self.model, args, self.dist)
            self.generate_fn = self.vllm.generate

    # ------------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None) -> list[dict]:
        """Train to max_steps (or until a stop signal, see signals.py, or a callback's should_training_stop, see
        callbacks.py), holding output_dir's run lock."""
        with run_lock.claim(self.args.output_dir, self.dist, bool(resume_from_checkpoint),
                            self.args.overwrite_output_dir), signals.StopOnSignal() as self._stop:
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint: str | None) -> list[dict]:
        args, info = self.args, self.dist
        gas, spg = args.gradient_accumulation_steps, args.steps_per_generation
        generate_every = spg * args.num_iterations  # micro-steps between two generation batches
        # Old log-probs differ from the current ones only when a generation batch outlives an optimizer step.
        # With vLLM they are also what its log-probs are compared with (importance-sampling correction, metrics).
        needs_old_logps = gas % generate_every != 0 or self.vllm is not None
        self.logger = MetricsLogger(args.output_dir, enabled=info.is_main, report_to=args.report_to,
                                    total_steps=self.max_steps, disable_progress_bar=args.disable_progress_bar,
                                    log_completions=args.log_completions,
                                    num_completions_to_print=args.num_completions_to_print)
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        else:
            self._fresh_output_files()
            checkpoint.seed_everything(args.seed + info.rank)  # rank-specific sampling, as TRL's set_seed
        for step, metrics in self._early_evals:  # evaluate() called before train(): log it now
            self.logger.log_eval(step, metrics)
        self._early_evals = []
        self.model.train()
        self.logger.start(self.step)
        events = self.callback_handler
        self._sync_state()
        events.event("on_train_begin")

        while self.step < self.max_steps:
            step_start, tokens_before = time.perf_counter(), self.num_tokens
            events.event("on_step_begin")
            times = {"time/generation": 0.0, "time/scoring": 0.0, "time/update": 0.0}
            step_loss = 0.0
            for micro in range(gas):
                micro_index = self.step * gas + micro

                if micro_index % generate_every == 0 or self.buffer is None:
                    # (1) Rollout: this rank's slice of the generation batch, sampled by the current policy.
                    t0 = time.perf_counter()
                    self.logger.phase("generating", self.step + 1,
                                      f"{args.generation_batch_size} completions of up to "
                                      f"{args.max_completion_length} tokens")
                    order = [self.train_rows[i] for i in self.sampler.next_batch()]
                    rows = rollout.rank_slice(order, info.rank, info.world_size)
                    self.model.eval()
                    with events.phase("generation"), update.autocast(self.model, args.bf16):
                        batch = self._run(rollout.generate_rollout, self.tokenizer, rows, args, self.generate_fn,
                                          generation=True)
                    self.model.train()
                    times["time/generation"] += time.perf_counter() - t0

                    # (2) Rewards of the whole generation batch (all ranks), advantages per group, our slice kept.
                    t0 = time.perf_counter()
                    self.logger.phase("scoring", self.step + 1)
                    with events.phase("scoring"):
                        self._score(batch)
                    times["time/scoring"] += time.perf_counter() - t0

                    # (3) Log-probs that the update compares against: old policy, reference (KL) policy.
                    t0 = time.perf_counter()
                    self.logger.phase("updating", self.step + 1)
                    if needs_old_logps or self.vllm is not None or args.beta != 0.0:
                        with events.phase("logprobs"):
                            self._old_and_ref_logps(batch, needs_old_logps)
                    self.buffer = batch.split(spg)
                    times["time/update"] += time.perf_counter() - t0

                # (4) Forward + backward of one micro-batch through the fused linear-GRPO loss.
                t0 = time.perf_counter()
                self.logger.phase("updating", self.step + 1)
                # FSDP's backward holds collectives every rank must join: no zero-signal skipping there.
                run = {} if self.fsdp_root is None else {"run": functools.partial(fsdp.run_in_root, self.fsdp_root),
                                                          "skip_zero_signal": False}
                with events.phase("update"):
                    loss, sums = update.micro_step(self.model, self.loss_fn, self.buffer[micro_index % spg], args,
                                                   info.world_size, **run)
                step_loss += loss
                for name, (total, count) in distributed.reduce_metric_sums({k: list(v) for k, v in sums.items()},
                                                                           info).items():
                    self.logger.add(name, total / count if count > 0 else float("nan"))
                times["time/update"] += time.perf_counter() - t0

            # (4b) Optimizer step: average gradients over ranks, clip, step, schedule.
            t0 = time.perf_counter()
            if self.fsdp_root is None:  # FSDP2 has already reduce-scattered (averaged) the gradients
                distributed.average_gradients(self.params, info)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm or float("inf"))
            learning_rate = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._sync_state()
            times["time/update"] += time.perf_counter() - t0
            if self.vllm is not None:  # the next rollout samples from the weights just updated
                times["time/weight_sync"] = self.vllm.sync(self.model)
            # What this step does next: what the config asks for, switched on as transformers' DefaultFlowCallback
            # does (on top of what a callback set earlier in the step); on_step_end may still change it.
            control = events.control
            control.should_log |= self.step % args.logging_steps == 0 or self.step == self.max_steps
            control.should_evaluate |= (bool(self.eval_rows) and args.eval_strategy == "steps"
                                        and self.step % args.eval_steps == 0)
            control.should_save |= self.step % args.save_steps == 0 or self.step == self.max_steps
            control = events.event("on_step_end")  # as transformers: after the optimizer step, before on_log

            # (5) Metrics: TRL's names; loss is averaged over ranks as transformers' Trainer logs it.
            step_time = time.perf_counter() - step_start
            loss_all = distributed.all_reduce_sum(torch.tensor([step_loss], dtype=torch.float64,
                                                               device=info.device), info)
            self.logger.add("loss", float(loss_all) / info.world_size)
            self.logger.add("step_time", step_time)
            self.logger.add("tokens_per_second", (self.num_tokens - tokens_before) / max(step_time, 1e-9))
            self.logger.add_many(times)
            if control.should_log:
                row = self.logger.log(self.step, {
                    "grad_norm": float(fsdp.full_value(grad_norm)), "learning_rate": learning_rate,
                    "num_tokens": self.num_tokens,
                    "epoch": self.sampler.epochs_done,
                })
                self.logger.step_line(row)
                control = events.event("on_log", logs=row)
            self.logger.progress(self.step, self.logger.history[-1] if self.logger.history else None)

            # (7) Evaluation every eval_steps, or when a callback asks (any rank's: it is a collective).
            if distributed.any_rank([control.should_evaluate], info)[0]:
                self.evaluate()  # calls on_evaluate
                control = events.control
                self.logger.write(f"[eval step {self.step}] accuracy={self.last_eval[1]['eval/accuracy']:.3f} "
                                  f"reward={self.last_eval[1]['eval/reward']:.3f}")

            # (6) Checkpoint every save_steps and at the end, when a callback asks, and before stopping on a signal
            # or a callback's should_training_stop (any rank's: every rank saves and stops after the same step).
            by_signal, by_callback, save = distributed.any_rank(
                [self._stop.received is not None, control.should_training_stop, control.should_save], info)
            if save or by_signal or by_callback:
                self.logger.phase("saving", self.step)
                self.save_checkpoint(final=by_callback)
                events.event("on_save")
            folder = Path(args.output_dir) / f"{checkpoint.PREFIX}{self.step}"
            if by_signal:  # (also at the last step: the command line then skips its final evaluation)
                self.stopped_by_signal = self._stop.reason()
                self.logger.write(f"[grpo] {self.stopped_by_signal}: stopped after step {self.step}/{self.max_steps} "
                                  f"and saved {folder}; continue with --resume_from_checkpoint {folder}")
                break
            if by_callback:  # a normal end of training, only earlier: final weights, evaluation, curve
                if self.step < self.max_steps:
                    self.logger.write(f"[grpo] a callback set should_training_stop: stopped after step "
                                      f"{self.step}/{self.max_steps} and saved {folder}")
                break

        self.plot_reward_curve()
        self.logger.close()
        events.event("on_train_end")
        return self.logger.history

    # ------------------------------------------------------------------------------------------------------------
    # Stage helpers
    # ------------------------------------------------------------------------------------------------------------
    def _score(self, batch: rollout.Rollout) -> None:
        """(2): scoring.score_rollout, counting the tokens and saying once that prompts were cut."""
        self._sync_state()
        tokens, said_cut = scoring.score_rollout(batch, self.reward_funcs, self.reward_names, self.args, self.dist,
                                                 self.callback_handler.state, self.unscorable, self.logger,
                                                 say_prompts_cut=not self._said_prompts_cut)
        self.num_tokens += tokens
        self._said_prompts_cut |= said_cut

    def _old_and_ref_logps(self, batch: rollout.Rollout, needs_old_logps: bool) -> None:
        """(3): the old-policy and reference log-probs of a generation batch, and vLLM's importance correction."""
        args = self.args
        if needs_old_logps:
            batch.old_logps = self._run(update.per_token_logps, batch, args)
        if self.vllm is not None:
            self.logger.add_many(vllm_importance.correct_rollout(batch, args, self.dist))
        if self.ref_model is not None:
            batch.ref_logps = self._run(update.per_token_logps, batch, args, ref=True)
        elif args.beta != 0.0:  # LoRA: the base model is the reference
            with lora.adapters_disabled(self.model):
                batch.ref_logps = self._run(update.per_token_logps, batch, args)

    def _sync_state(self) -> None:
        """The TrainerState that callbacks and reward functions see, brought up to date."""
        state = self.callback_handler.state
        state.global_step, state.max_steps, state.epoch = self.step, self.max_steps, self.sampler.epochs_done
        state.log_history = self.logger.history if self.logger is not None else []

    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Accuracy and mean rewards on eval_dataset (greedy when eval_temperature is 0); logged during training."""
        rows = self._as_rows(eval_dataset, "eval_dataset") if eval_dataset is not None else self.eval_rows
        if not rows:
            raise ValueError("evaluate() needs an eval_dataset (pass one here or to GRPOTrainer)")
        n = min(len(rows), self.args.eval_max_samples or len(rows))
        if self.logger is not None:
            self.logger.phase("evaluating", self.step, f"{n} held-out problems")
        elif self.dist.is_main:  # before train(): no logger yet
            print(f"[grpo] evaluating on {n} held-out problems", flush=True)
        with update.autocast(self.model, self.args.bf16):
            metrics = self._run(eval_lib.evaluate, self.tokenizer, rows, self.reward_funcs, self.args.reward_weights,
                                self.args, self.dist, batch_size=max(self.args.generation_batch_size, 16),
                                generate_fn=self.generate_fn, generation=True)
        self.last_eval = (self.step, metrics)
        if self.logger is not None:
            self.logger.log_eval(self.step, metrics)
        else:  # before train(): kept for metrics.jsonl and the reward curve (step 0 = the starting point)
            self._early_evals.append((self.step, metrics))
        self._sync_state()
        self.callback_handler.event("on_evaluate", metrics=metrics)
        return metrics

    def plot_reward_curve(self) -> None:
        """<output_dir>/reward_curve.png from the metrics so far (train reward, eval accuracy); main rank only."""
        if self.dist.is_main and self.logger is not None:
            plot_reward_curve(self.logger.history, f"{self.args.output_dir}/reward_curve.png", self.reward_names)

    def save_checkpoint(self, final: bool = False) -> None:
        """checkpoint-<step>, written by the main rank into a temporary folder and renamed into place. The last
        step's (or, with `final`, a callback's early end) also holds full weights when the model is sharded."""
        info, args = self.dist, self.args
        next_micro = self.step * args.gradient_accumulation_steps
        keep_buffer = self.buffer is not None and next_micro % (args.steps_per_generation * args.num_iterations) != 0
        rngs = distributed.all_gather_object(checkpoint.rng_state(), info)
        buffers = None
        if keep_buffer:  # the next step still consumes this generation batch: keep it to resume exactly
            local = [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in mb.to_state().items()}
                     for mb in self.buffer]
            buffers = distributed.all_gather_object(local, info)
        state = {
            "step": self.step, "max_steps": self.max_steps, "epoch": self.sampler.epochs_done,
            "sampler": self.sampler.state_dict(), "num_tokens": self.num_tokens,
            "world_size": info.world_size, "generation_batch_size": args.generation_batch_size,
            "reward_names": self.reward_names,
            "config": args.to_dict(), "log_history": self.logger.history if self.logger else [],
        }
        if self.fsdp_root is not None:  # every rank writes its shards; the final step also gets full weights
            checkpoint.save_sharded(args.output_dir, self.step, self.model, self.tokenizer, self.optimizer,
                                    self.scheduler, state, rngs, buffers, args.save_total_limit, info,
                                    full_weights=final or self.step == self.max_steps)
            return
        if info.is_main:
            checkpoint.save(args.output_dir, self.step, self.model, self.tokenizer, self.optimizer, self.scheduler,
                            state, rngs, buffers, args.save_total_limit)
        distributed.barrier(info)

    def _resume(self, spec) -> None:
        info = self.dist
        folder = checkpoint.resolve_checkpoint(spec, self.args.output_dir)
        if self.fsdp_root is not None:
            state, rng, buffer = checkpoint.load_sharded(folder, self.model, self.optimizer, self.scheduler, info)
            if state["world_size"] != info.world_size:  # DCP resharded the model and optimizer
                if state.get("generation_batch_size") != self.args.generation_batch_size:
                    raise ValueError(f"{folder} was trained with generation_batch_size="
                                     f"{state.get('generation_batch_size')}; at another world size keep it "
                                     f"(this run has {self.args.generation_batch_size}) so the prompt order continues")
                # Per-rank sampling streams cannot carry over to another number of ranks: fresh, step-dependent
                # seeds. The run continues from the same weights, optimizer and data order, not bit-identically.
                rng = None
                checkpoint.seed_everything(self.args.seed + info.rank + 100_003 * state["step"])
        else:
            state, rng, buffer = checkpoint.load(folder, self.model, self.optimizer, self.scheduler, info.rank)
        if state["world_size"] != info.world_size and self.fsdp_root is None:
            raise ValueError(f"{folder} was written by {state['world_size']} processes, this run has "
                             f"{info.world_size}: resume with the same number of processes")
        self.step, self.num_tokens = state["step"], state["num_tokens"]
        self.sampler.load_state_dict(state["sampler"])
        self.buffer = [rollout.Rollout.from_state(s, info.device) for s in buffer] if buffer else None
        if rng is not None:
            checkpoint.set_rng_state(rng)
        self.logger.restore(state["log_history"], self.step)
        if self.vllm is not None:
            self.vllm.sync(self.model)
        self.logger.write(f"[grpo] resumed from {folder} at step {self.step}/{self.max_steps}")

    # ------------------------------------------------------------------------------------------------------------
    # Setup helpers
    # ------------------------------------------------------------------------------------------------------------
    def _load_policy(self, model, processing_class, peft_config=None):
        args, device = self.args, self.dist.device
        # Recorded in a LoRA checkpoint's adapter_config.json, so that `grpo eval` finds the base model.
        base_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if base_name and Path(base_name).exists():
            base_name = str(Path(base_name).resolve())
        if isinstance(model, str):
            attn = args.attn_implementation
            if attn is None and device.type == "cuda" and _flash_attn_installed():
                attn = "flash_attention_2"
            model, tokenizer = model_lib.load_model(model, attn_implementation=attn,
                                                    model_init_kwargs=args.model_init_kwargs)
            tokenizer = processing_class or tokenizer
        else:
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model must be a name/path or a PreTrainedModel, got {type(model).__name__}")
            if processing_class is None:
                raise ValueError("processing_class (the tokenizer) is required when model is a model instance")
            tokenizer = processing_class
        model_lib.prepare_tokenizer(tokenizer)
        model = model.to(device)
        if peft_config is not None:  # before disable_dropout, which then also zeroes the LoRA dropout (as TRL)
            model = lora.apply(model, peft_config, base_name_or_path=base_name, seed=args.seed)
        if args.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if args.gradient_checkpointing:  # renamed activation_checkpointing in transformers 5
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, tokenizer

    def _run(self, fn, *args, ref: bool = False, generation: bool = False, **kwargs):
        """fn(policy, *args): directly, or inside FSDP2's root forward when the model is sharded (see fsdp.py)."""
        root = self.ref_root if ref else self.fsdp_root
        if root is None:
            return fn(self.ref_model if ref else self.model, *args, **kwargs)
        if generation:
            return fsdp.run_generation(root, fn, *args, **kwargs)
        return fsdp.run_in_root(root, fn, *args, **kwargs)

    def _as_rows(self, dataset, what: str) -> list[dict]:
        rows = [dict(r) for r in dataset]
        if not rows:
            raise ValueError(f"{what} is empty")
        if "prompt" not in rows[0]:
            raise ValueError(f"{what} rows need a 'prompt' column (a string or a list of chat messages); "
                             f"got columns {sorted(rows[0])}")
        data.check_prompts(rows, what)
        system = self.args.system_prompt
        if system:
            for r in rows:
                p = r["prompt"]
                if rollout.is_conversational(p) and p[0].get("role") != "system":
                    r["prompt"] = [{"role": "system", "content": system}, *p]
        return rows

    def _total_steps(self) -> int:
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        micro_per_epoch = self.sampler.batches_per_epoch * args.steps_per_generation * args.num_iterations
        return max(1, math.ceil(args.num_train_epochs * micro_per_epoch / args.gradient_accumulation_steps))

    def _fresh_output_files(self) -> None:
        """A new run starts new metrics/completions files (a resumed one rewrites them from its checkpoint)."""
        if self.dist.is_main:
            for name in ("metrics.jsonl", "completions.jsonl"):
                path = self.logger.dir / name
                if path.exists():
                    path.unlink()


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
