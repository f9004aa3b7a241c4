"""GQ codebook search: ``gq_search`` (best index per row) and ``gq_search_topk`` dispatch to a fused Triton kernel on
CUDA tensors and to a cache-blocked torch path elsewhere. Both rank by the float32 GEMM form of the reference score and
resolve ties to the lowest index; see ``docs/kernels.md``. Triton is imported only when that backend is used."""
from kernels.search import gemm_to_log_ratio, gq_search, gq_search_topk, prepare_features

__all__ = ["gq_search", "gq_search_topk", "prepare_features", "gemm_to_log_ratio"]
