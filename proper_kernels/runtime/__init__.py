"""Pure-torch facts about where and how the kernels run (importable without triton):
the GPU generation a launch is tuned for, whether the Triton CPU interpreter works,
and the tile schedule of the per-user segment kernels."""
from .target import DEFAULT_ARCH, device_arch, interpreter_problem, max_shared_memory, target_arch
from .tiling import segment_chunks, segment_tiles

__all__ = ["DEFAULT_ARCH", "device_arch", "interpreter_problem", "max_shared_memory", "target_arch",
           "segment_chunks", "segment_tiles"]
