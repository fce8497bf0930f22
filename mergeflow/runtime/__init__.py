"""Switch runtime: serve T-Switch / Auto-Switch from one base model, switching tasks in place.

Per request batch the weighted sum of binary task switches theta_0 + sum_t w_t * s_t * B_t is
applied to the live weights, the model runs and the switches are removed again, bitwise
exactly, without copying the model. How (bit packing, the backup of only the entries
subtraction cannot restore, chunks and worker threads) and which module does what:
docs/runtime.md.
"""

from mergeflow.runtime.chunks import CPU_CHUNK as CPU_CHUNK, CUDA_CHUNK as CUDA_CHUNK
from mergeflow.runtime.model import SwitchModel, load_runtime
from mergeflow.runtime.packing import PackedSwitch, PackedTensor, pack_ternary, unpack_ternary
from mergeflow.runtime.switch_runtime import SwitchRuntime

__all__ = [
    "PackedTensor",
    "PackedSwitch",
    "SwitchRuntime",
    "SwitchModel",
    "load_runtime",
    "pack_ternary",
    "unpack_ternary",
]
