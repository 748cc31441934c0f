"""Per-iteration time from a roofline: bytes moved, FLOPs, fitted efficiencies, fixed overhead.

One engine iteration runs every scheduled token through the weights once. Its time is

    overhead + max(weight bytes / BW_w, 2 x params x tokens / FLOPS_mm)      # GEMMs
             + per-sequence cost x sequences                                  # norms, sampling
             + max(KV bytes read / BW_kv, longest context x latency floor)    # decode attention
             + prefill attention FLOPs / FLOPS_attn                           # causal, quadratic
             + tensor-parallel all-reduces

and a step that runs any prefill takes at least ``prefill_floor_ms`` (kernel launches the
CUDA-graph decode path does not pay). Constants live in :mod:`.profiles`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .profiles import REFERENCE_BW, Profile


@dataclass(slots=True)
class StepShape:
    """What one iteration computes, in aggregate (no per-request detail needed)."""

    decode_seqs: int = 0
    decode_context_tokens: int = 0  # sum of KV lengths read by decoding sequences
    max_decode_context: int = 0
    prefill_tokens: int = 0
    prefill_attention_work: float = 0.0  # sum over chunks of chunk x (prior context + chunk / 2)

    def add_decode(self, context: int) -> None:
        self.decode_seqs += 1
        self.decode_context_tokens += context
        if context > self.max_decode_context:
            self.max_decode_context = context

    def add_prefill(self, chunk: int, prior_context: int) -> None:
        self.prefill_tokens += chunk
        self.prefill_attention_work += chunk * (prior_context + chunk / 2)

    @property
    def tokens(self) -> int:
        return self.decode_seqs + self.prefill_tokens

    @property
    def empty(self) -> bool:
        return self.tokens == 0


def step_time_ms(profile: Profile, shape: StepShape) -> float:
    """Milliseconds one iteration of ``shape`` takes on ``profile`` (emulated, not wall-clock)."""
    eff = profile.efficiency
    model = profile.model
    bw = profile.hbm_bytes_per_s
    flops = profile.flops
    bw_scale = REFERENCE_BW / profile.gpu.hbm_bytes_per_s  # slower memory -> slower small ops

    gemm = (
        max(
            model.weight_bytes / (bw * eff.weights_bw),
            2.0 * model.params * shape.tokens / (flops * eff.matmul),
        )
        * 1e3
    )
    per_seq = eff.per_seq_ms * bw_scale * (shape.decode_seqs + (1 if shape.prefill_tokens else 0))
    kv_read = shape.decode_context_tokens * profile.kv_bytes_per_token / (bw * eff.kv_bw) * 1e3
    attn_floor = shape.max_decode_context * eff.attn_latency_ms_per_token
    decode_attention = max(kv_read, attn_floor)
    # QK^T and AV: 2 matmuls x 2 FLOPs x hidden per (query, key) pair per layer.
    prefill_attention = 4.0 * model.layers * model.hidden * shape.prefill_attention_work / (flops * eff.attention) * 1e3
    tp = 2 * model.layers * profile.tp_allreduce_ms_per_layer if profile.tensor_parallel > 1 else 0.0
    total = eff.step_overhead_ms + gemm + per_seq + decode_attention + prefill_attention + tp
    if shape.prefill_tokens:
        total = max(total, eff.prefill_floor_ms)
    return total
