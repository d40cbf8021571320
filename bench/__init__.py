"""grpo-kernels benchmark suite: `python -m bench {loss,logprobs,step} ...` (see bench/README.md)."""
