"""pdserve: LLM serving with prefill/decode disaggregation."""

__version__ = "0.1.0"

# Read the environment once, now: PDSERVE_CPU_ISA must cap torch's kernels before torch runs any (envs.py).
from pdserve import envs as _envs  # noqa: E402,F401
