"""Hardware and model profiles for the emulator's roofline timing model.

Efficiency factors were fitted (least squares on log error) to the step times measured on a
real H200 (``shared/data/calibration/h200_llama3_8b_measured.json``); every fitted point is
within ±10%. They are expressed against *spec-sheet* bandwidth and FLOP rate so that they
carry over to other GPUs. Where a public report gives a better figure for a specific GPU
(A100: single-stream decode at 77% of the bandwidth bound), the profile overrides it.
"""

from __future__ import annotations

import msgspec

KIB = 1024
GB = 1e9


class ModelSpec(msgspec.Struct, frozen=True):
    """Architecture numbers that decide bytes moved and FLOPs per token."""

    name: str
    params: float  # parameter count
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    bytes_per_param: int = 2  # bf16
    max_position: int = 8192

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param


class GpuSpec(msgspec.Struct, frozen=True):
    name: str
    hbm_bytes_per_s: float  # spec-sheet bandwidth
    bf16_flops: float  # dense bf16 matmul rate, spec sheet
    memory_bytes: float


class Efficiency(msgspec.Struct, frozen=True):
    """Fitted factors; see module docstring. Times in milliseconds."""

    weights_bw: float = 0.644  # share of spec bandwidth reached streaming weights
    matmul: float = 0.570  # share of spec bf16 rate reached by GEMMs
    kv_bw: float = 0.909  # share of spec bandwidth reached reading KV at large batch
    attention: float = 1.0  # share of matmul rate reached by prefill attention
    per_seq_ms: float = 0.01259  # non-GEMM cost per sequence in the batch (on H200 bandwidth)
    attn_latency_ms_per_token: float = 0.000336  # one sequence's attention latency floor per context token
    step_overhead_ms: float = 0.596  # fixed per-iteration overhead (scheduling, launch)
    prefill_floor_ms: float = 12.19  # any step that runs prefill takes at least this long


# Ampere: a public report measures 75 tok/s single-stream for Llama-3.1-8B on an A100 40 GB
# ("77% of the bandwidth bound", all per-step costs included). With this model's fixed
# overhead and attention terms that needs the weight stream at 84% of spec bandwidth.
AMPERE_EFFICIENCY = Efficiency(weights_bw=0.84)

MODELS: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec("llama2-7b", 6.74e9, 32, 4096, 32, 128, max_position=4096),
    "llama3-8b": ModelSpec("llama3-8b", 8.03e9, 32, 4096, 8, 128),
    "llama3-70b": ModelSpec("llama3-70b", 70.6e9, 80, 8192, 8, 128),
}

GPUS: dict[str, GpuSpec] = {
    "a10": GpuSpec("a10", 0.6e12, 125e12, 24 * GB),
    "a100-40g": GpuSpec("a100-40g", 1.555e12, 312e12, 40 * GB),
    "a100-80g": GpuSpec("a100-80g", 2.0e12, 312e12, 80 * GB),
    "h100": GpuSpec("h100", 3.35e12, 990e12, 80 * GB),
    "h200": GpuSpec("h200", 4.8e12, 990e12, 141 * GB),
}

REFERENCE_BW = GPUS["h200"].hbm_bytes_per_s


class Profile(msgspec.Struct, frozen=True):
    """One deployment shape: a model on N GPUs of one kind, with engine defaults."""

    name: str
    model: ModelSpec
    gpu: GpuSpec
    tensor_parallel: int = 1
    efficiency: Efficiency = Efficiency()
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes: float = 2 * GB  # per GPU: activations, CUDA graphs, workspace
    tp_allreduce_ms_per_layer: float = 0.02  # two all-reduces per layer over NVLink
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    host_to_device_bytes_per_s: float = 25 * GB  # PCIe: weights back from CPU (sleep level 1)
    disk_bytes_per_s: float = 2 * GB  # weights from local NVMe (sleep level 2, cold start)
    cold_start_s: float = 25.0  # process start, CUDA init, graph capture (excl. weight load)

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.gpu.hbm_bytes_per_s * self.tensor_parallel

    @property
    def flops(self) -> float:
        return self.gpu.bf16_flops * self.tensor_parallel

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    @property
    def num_gpu_blocks(self) -> int:
        """KV blocks that fit after weights and the activation reserve (vLLM's own arithmetic)."""
        usable = self.gpu.memory_bytes * self.gpu_memory_utilization * self.tensor_parallel
        free = usable - self.model.weight_bytes - self.activation_reserve_bytes * self.tensor_parallel
        if free <= 0:
            raise ValueError(f"profile {self.name}: weights do not fit in GPU memory")
        return int(free // (self.block_size * self.kv_bytes_per_token))

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size


def _profile(name: str, model: str, gpu: str, **kw: object) -> Profile:
    return Profile(name=name, model=MODELS[model], gpu=GPUS[gpu], **kw)  # type: ignore[arg-type]


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        # A10 (24 GB): small budget as vLLM picks for small GPUs.
        _profile(
            "a10-llama2-7b",
            "llama2-7b",
            "a10",
            max_num_batched_tokens=2048,
            efficiency=AMPERE_EFFICIENCY,
        ),
        # A100 40 GB: public report, 75 tok/s single stream (all costs included) -> see AMPERE_EFFICIENCY.
        _profile(
            "a100-40g-llama3-8b",
            "llama3-8b",
            "a100-40g",
            max_num_batched_tokens=2048,
            efficiency=AMPERE_EFFICIENCY,
        ),
        _profile("a100-80g-llama3-8b", "llama3-8b", "a100-80g", efficiency=AMPERE_EFFICIENCY),
        _profile("h100-llama3-8b", "llama3-8b", "h100"),
        _profile("h200-llama3-8b", "llama3-8b", "h200"),
        _profile("4xh100-llama3-70b", "llama3-70b", "h100", tensor_parallel=4),
    )
}

DEFAULT_PROFILE = "h100-llama3-8b"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {name!r}; known profiles: {known}") from None
