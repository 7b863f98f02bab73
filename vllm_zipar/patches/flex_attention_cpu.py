"""Eager FlexAttention in vLLM's FlexAttention backend, on the CPU platform only (CI runs the GPU route).

vLLM 0.32's `vllm.v1.attention.backends.flex_attention` calls module globals `flex_attention_compiled` and
`create_block_mask_compiled` (`torch.compile` of PyTorch's functions). On the CPU, inductor's lowering of the
paged block mask fails ("KV seqlen must be smaller than the block_mask size in the KV dimension"), so this
patch points both names at the eager PyTorch functions: the same attention, computed without compilation
(several times slower; CPU deployments use the CPU backend). Never applied on CUDA.
"""

from __future__ import annotations

WRITTEN_FOR = "0.32.0"


def apply() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from vllm.v1.attention.backends import flex_attention as backend

    from vllm_zipar.patches import check_vllm_version

    check_vllm_version("flex_attention_cpu", WRITTEN_FOR)
    backend.flex_attention_compiled = flex_attention
    backend.create_block_mask_compiled = create_block_mask
