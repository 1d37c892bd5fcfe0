"""What an algorithm choice depends on: the problem description shared by the registry and the autotuner."""
from __future__ import annotations

from dataclasses import dataclass


def n_bucket(n: int) -> int:
    """Round a row count up to a power of two so that similar scans share a tuning result."""
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclass(frozen=True)
class Problem:
    op: str  # "conv" | "depthwise"
    direction: str  # "fwd" | "dgrad" | "wgrad"
    device: str  # "cpu" | "gpu"
    dtype: str  # "float16" | "bfloat16" | "float32" | "float64"
    n_in: int
    n_out: int
    c_in: int
    c_out: int
    num_offsets: int
    stride: tuple
    kind: str
    gpu_name: str = ""
    tf32: bool = False

    def key(self) -> str:
        """The autotune cache key: everything that changes the best choice (N bucketed)."""
        return "|".join(str(v) for v in (
            self.op, self.direction, self.device, self.gpu_name, self.dtype, "tf32" if self.tf32 else "ieee",
            n_bucket(self.n_in), n_bucket(self.n_out), self.c_in, self.c_out, self.num_offsets,
            "x".join(map(str, self.stride)), self.kind))
