"""Pure-PyTorch oracle of the PROPER layer: runs anywhere, the fallback of every op."""
from .losses import balance_loss, diversity_loss
from .adapters import ADAPTER_TENSORS, Adapters
from .mixture import compute_dtype, gates_from_logits, lora_mixture_ref, lora_mixture_ref_loop
from .rankspace import mixture_bwd_ref, mixture_fwd_ref

__all__ = [
    "Adapters", "ADAPTER_TENSORS", "lora_mixture_ref", "lora_mixture_ref_loop", "gates_from_logits", "compute_dtype",
    "mixture_fwd_ref", "mixture_bwd_ref", "balance_loss", "diversity_loss",
]
