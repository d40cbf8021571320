"""Adapters that put grpo_kernels inside other trainers, one module per trainer:

    from grpo_kernels.integrations import trl as gkt;  gkt.patch()    # TRL's trainers
    from grpo_kernels.integrations import verl as gkv; gkv.patch()    # verl's fused log-prob path

They use grpo_kernels' public API only and import their trainer lazily (inside patch()); nothing in
grpo_kernels imports them, and importing this package imports neither TRL nor verl.
"""
