"""Importing this module runs `grpo_kernels.integrations.verl.patch()`: the form verl's workers load with
`actor_rollout_ref.model.external_lib=grpo_kernels.integrations.verl_patch` (verl imports external_lib in
each worker process before it builds the model)."""

from .verl import patch

patched_bindings = patch()
