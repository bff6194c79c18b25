"""Training-memory planning for large runs, from a model built on the meta device (no allocation).

Notation: P parameters (all trainable, tied weights once), N = B·T tokens of one GPU's micro-batch,
G GPUs, d = d_model, f = d_ff, V = vocab, L layers, H heads (H/2 differential heads), r = HGF rank,
c = bytes of the compute dtype (2 under bf16 autocast, 4 in float32).

State per GPU (fp32 master weights, AdamW with exp_avg and exp_avg_sq in fp32):
    weights 4P, grads 4P, AdamW 8P, foreach-AdamW step temporary (sqrt(exp_avg_sq)) 4P;
    FSDP2 divides each by G and adds ``gathered`` = c·(P_root + 2·P_block) + 4·P_block: the root
    unit (embedding, final norm, head) stays unsharded, one block computes while the next is
    prefetched, one block's unsharded fp32 gradient waits for its reduce-scatter.
Peak per GPU = max(forward/backward, optimizer step):
    forward  = weights + AdamW + gathered + activations + head transient (+ grads under DDP, whose
               buckets hold them all step long, with gradient_as_bucket_view=True)
    step     = weights + grads + AdamW + step temporary

Activations: what autograd saves for backward, per block, in bytes. RMSNorm is PyTorch's
decomposition: it saves its input upcast to fp32, the normalised fp32 tensor and the rstd
(4·N·w + 4·N·w + 4·N). Attention is a fused kernel (no T×T matrix) saving q, k, v, out and the fp32
log-sum-exp.
    block input + attn_norm          4·N·d + 4·N·d + 4·N
    standard attention               q, k (after RoPE), v, out: 4·c·N·d + 4·N·H
    differential attention           q, k, v, out₁, out₂: 5·c·N·d + 2·4·N·H/2;
                                     head norm over 2·d_h: 8·N·d + 4·N·H/2
    SubLN before o_proj              4·N·d + 4·N, + 4·N·d when its input is not an fp32 tensor
                                     saved anyway (fp32 standard attention output is shared)
    mlp_norm (its input h too)       4·N·d + 4·N·d + 4·N
    gated MLP                        gate out, act(gate), up out: 3·c·N·f
    SubLN before down_proj           4·N·f + 4·N·f + 4·N
Each projection [in -> out] adds what its matmul saves:
    dense      its input once per distinct input tensor (4·N·in), or under autocast one bf16 cast
               per consumer (2·N·in each) plus the autocast-cached bf16 weight (2·in·out)
    BitLinear  the STE-quantized input x_q, one per projection (c·N·in), and the STE-quantized
               weight W_t/s_w (c·in·out): the extra tensors of the quantizers/STE (the int8 and
               ternary intermediates are detached and freed)
    HGFLinear  BitLinear's terms + the correction input (as a dense input) + A·x (c·N·r) +
               g·B (c·out·r; the fused function's backward needs no N·out tensor, for either
               fusion) + under autocast the bf16 casts of A and g·B
Head: int64 token ids and loss targets 16·N, final norm 8·N·d + 4·N, LM-head input (4·N·d, or a 2·N·d cast and
the 2·V·d bf16 weight under autocast), the loss's fp32 log-softmax 4·N·V; transient at the loss
(gradients of the log-probabilities and of the logits) 8·N·V.
Activation checkpointing (per block): L · 4·N·d block inputs + max(head saved + loss transient,
one recomputed block + two fp32 activation gradients 8·N·max(d, f) + the gradients built so far,
up to 4P): the loss's tensors are gone before a block is recomputed.

Checks (tests/test_plan.py): the float32 and the CPU bf16-autocast formulas equal autograd's
saved tensors exactly for standard attention; on CPU differential attention runs the math kernel
(its head halves are strided), which saves the two T×T softmax matrices instead of the
log-sum-exps (``attention_kernel="math"``). CUDA kernels (fused RMSNorm) and allocator
fragmentation move real numbers by a few percent: the fits decision keeps ``headroom`` free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hgf.config import Config, kv_heads, subln_enabled
from hgf.errors import HGFError
from hgf.kernels.packing import PACKINGS
from hgf.memory import MemoryReport, format_report, memory_report
from hgf.model.linear import FP16, block_projections, linear_kind, resolve_rank

STRATEGIES = ("ddp", "fsdp2")
GIB = 1024**3
_UNITS = {"": GIB, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 1024, "mib": 1024**2, "gib": GIB, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``"80GB"`` (10⁹), ``"80GiB"`` (2³⁰), ``"80"`` (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise HGFError(f"--gpu-mem {text!r}: expected a size like 80GB, 80GiB or 80")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# ---------------------------------------------------------------------------------------------
# Activations


def _linears(cfg: Config, roles: list[tuple[str, int, int]], n: int, autocast: bool,
             input_fp32: bool, input_saved: bool) -> int:
    """Bytes saved by projections sharing one input ``[N, in]``: ``input_fp32`` says its dtype,
    ``input_saved`` that the very tensor is already counted (a matmul saving it adds nothing)."""
    c = FP16 if autocast else 4
    rank = resolve_rank(cfg) if cfg.model.linear == "hgf" else 0
    total, readers = 0, 0
    for role, i, o in roles:
        kind = linear_kind(role, cfg)
        if kind != "dense":
            total += c * n * i + c * i * o  # x_q and W_t/s_w
        if kind != "bitlinear":
            readers += 1  # reads the unquantized input (dense matmul or HGF correction)
            if autocast:
                total += FP16 * (i * o if kind == "dense" else rank * (i + o))
        if kind == "hgf":  # A x (r×N), and g·B (out×r; under autocast its cast, counted above)
            total += c * n * rank + (0 if autocast else c * o * rank)
    i = roles[0][1]
    if readers and autocast and input_fp32:
        total += readers * FP16 * n * i  # one bf16 cast per consumer
    elif readers and not input_saved:
        total += c * n * i if not input_fp32 else 4 * n * i
    return total


def _norm(n: int, width: int, input_counted: bool = False) -> int:
    """RMSNorm: fp32 input (unless that tensor is already counted), normalised tensor, rstd."""
    return (0 if input_counted else 4 * n * width) + 4 * n * width + 4 * n


def block_activation_bytes(cfg: Config, batch: int, seq: int, autocast: bool,
                           attention_kernel: str = "fused") -> int:
    """Bytes one block saves for backward on a ``batch × seq`` micro-batch (module docstring)."""
    m = cfg.model
    n, d, f, c = batch * seq, m.d_model, m.d_ff, (FP16 if autocast else 4)
    kv_dim = kv_heads(m) * (d // m.n_heads)
    proj = {role: (role, i, o) for role, i, o in block_projections(d, f, kv_dim)}
    sub = subln_enabled(m)
    total = _norm(n, d)  # block input + attn_norm
    total += _linears(cfg, [proj["q_proj"], proj["k_proj"], proj["v_proj"]], n, autocast,
                      input_fp32=True, input_saved=False)
    if m.attention == "standard":
        total += 4 * c * n * d + 4 * n * m.n_heads
        out_fp32, out_saved = not autocast, True  # o_proj reads a view of the kernel's output
    else:
        h = m.n_heads // 2
        if attention_kernel == "math":  # two T×T softmax matrices instead of log-sum-exps
            total += 5 * c * n * d + 2 * 4 * batch * h * seq * seq
        else:
            total += 5 * c * n * d + 2 * 4 * n * h
        total += 8 * n * d + 4 * n * h  # head RMSNorm over 2·d_h
        out_fp32, out_saved = not autocast, False  # heads re-laid out: a fresh copy
    if sub:
        total += _norm(n, d, input_counted=out_fp32 and out_saved)
        out_fp32, out_saved = True, False
    total += _linears(cfg, [proj["o_proj"]], n, autocast, out_fp32, out_saved)
    total += _norm(n, d)  # mlp_norm and its input h
    total += _linears(cfg, [proj["gate_proj"], proj["up_proj"]], n, autocast,
                      input_fp32=True, input_saved=False)
    total += 3 * c * n * f
    if sub:
        total += _norm(n, f)
    total += _linears(cfg, [proj["down_proj"]], n, autocast, input_fp32=sub or not autocast,
                      input_saved=False)
    return total


def head_activation_bytes(cfg: Config, n: int, autocast: bool) -> tuple[int, int]:
    """(saved, transient) bytes of the embedding, final norm, LM head and loss on ``n`` tokens."""
    d, v = cfg.model.d_model, cfg.model.vocab_size
    saved = 16 * n + _norm(n, d) + 4 * n * v  # int64 token ids and targets
    saved += FP16 * n * d + FP16 * d * v if autocast else 4 * n * d
    return saved, 8 * n * v


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class StrategyMemory:
    """Bytes per GPU under one strategy; ``peak`` combines them (module docstring)."""

    weights: float
    grads: float
    optimizer: float
    optimizer_step: float
    gathered: float
    activations: float  # saved without checkpointing (blocks + head)
    head_transient: float  # around the loss: log-prob and logit gradients
    block_inputs: float  # with checkpointing: the saved block inputs
    block_recompute: float  # one recomputed block + its backward transient
    grads_resident: bool  # DDP buckets hold the gradients all step long
    blocks_saved: float  # the blocks' share of ``activations`` (the rest is the head's)

    @property
    def activations_ac(self) -> float:
        """Peak activations with checkpointing, without the loss transient and the gradients."""
        return self.block_inputs + max(self.activations - self.blocks_saved, self.block_recompute)

    def peak(self, ac: bool) -> float:
        if ac:  # the loss's tensors are gone before a block is recomputed, grads are then built up
            late = self.block_recompute + (0 if self.grads_resident else self.grads)
            acts = self.block_inputs + max(self.activations - self.blocks_saved + self.head_transient, late)
        else:
            acts = self.activations + self.head_transient
        forward = (self.weights + self.optimizer + self.gathered + acts
                   + (self.grads if self.grads_resident else 0))
        return max(forward, self.weights + self.grads + self.optimizer + self.optimizer_step)


@dataclass
class Plan:
    cfg: Config
    report: MemoryReport
    gpus: int
    gpu_mem: int
    micro_batch: int
    seq_len: int
    strategy: str
    autocast: bool
    headroom: float
    block_params: int
    root_params: int
    block_activations: int
    memory: dict[str, StrategyMemory]  # ddp, fsdp2, and "single" (one process, no wrapper)

    def fits(self, strategy: str, ac: bool) -> bool:
        return self.memory[strategy].peak(ac) <= (1 - self.headroom) * self.gpu_mem

    def as_dict(self) -> dict:
        mem = {s: {**vars(v), "activations_ac": v.activations_ac, "peak": v.peak(False),
                   "peak_ac": v.peak(True), "fits": self.fits(s, False), "fits_ac": self.fits(s, True)}
               for s, v in self.memory.items()}
        return {"gpus": self.gpus, "gpu_mem": self.gpu_mem, "micro_batch": self.micro_batch,
                "seq_len": self.seq_len, "strategy": self.strategy, "autocast": self.autocast,
                "headroom": self.headroom, "params": self.report.as_dict()["params"],
                "block_params": self.block_params, "root_params": self.root_params,
                "block_activations": self.block_activations, "memory": mem,
                "packed_bytes": {p: self.report.total_bytes(p) for p in PACKINGS}}


def make_plan(cfg: Config, gpus: int, gpu_mem: int, micro_batch: int, seq_len: int,
              strategy: str = "ddp", autocast: bool = True, headroom: float = 0.1,
              attention_kernel: str = "fused") -> Plan:
    """Plan the training memory of ``cfg`` per GPU; the model is built on the meta device."""
    from hgf.model.transformer import build_model

    if strategy not in STRATEGIES:
        raise HGFError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    for name, v in (("--gpus", gpus), ("--micro-batch", micro_batch), ("--seq-len", seq_len)):
        if v <= 0:
            raise HGFError(f"{name}={v}: must be > 0")
    if seq_len > cfg.model.max_seq_len:
        raise HGFError(f"--seq-len={seq_len}: exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if not 0 <= headroom < 1:
        raise HGFError(f"--headroom={headroom}: must lie in [0, 1)")
    model = build_model(cfg, device="meta")
    rep = memory_report(model)
    p, layers = rep.total_params, cfg.model.n_layers
    block = sum(t.numel() for t in model.layers[0].parameters())
    root = p - layers * block
    n = micro_batch * seq_len
    act_block = block_activation_bytes(cfg, micro_batch, seq_len, autocast, attention_kernel)
    head_saved, head_transient = head_activation_bytes(cfg, n, autocast)
    m = cfg.model
    recompute = act_block + 2 * 4 * n * max(m.d_model, m.d_ff)  # + two fp32 activation grads
    c = FP16 if autocast else 4

    def state(share: int, gathered: float, resident: bool) -> StrategyMemory:
        return StrategyMemory(4 * p / share, 4 * p / share, 8 * p / share, 4 * p / share, gathered,
                              layers * act_block + head_saved, head_transient,
                              layers * 4 * n * m.d_model, recompute, resident, layers * act_block)

    memory = {"single": state(1, 0, False), "ddp": state(1, 0, True),
              "fsdp2": state(gpus, c * (root + 2 * block) + 4 * block, False)}
    return Plan(cfg, rep, gpus, gpu_mem, micro_batch, seq_len, strategy, autocast, headroom,
                block, root, act_block, memory)


def format_plan(plan: Plan) -> str:
    """The parameter/packing report and the per-GPU training-memory table (GiB)."""
    m = plan.cfg.model
    rows = [("weights (fp32 master)", "weights"), ("gradients (fp32)", "grads"),
            ("AdamW states (fp32)", "optimizer"), ("AdamW step temporary", "optimizer_step"),
            ("gathered params/grads", "gathered"), ("activations, no AC", "activations"),
            ("loss transient, no AC", "head_transient"), ("activations, AC", "activations_ac")]
    dt = "bf16 autocast" if plan.autocast else "float32"
    lines = [
        f"model: {m.linear} / {m.attention}, d_model {m.d_model} x {m.n_layers} layers, "
        f"d_ff {m.d_ff}, vocab {m.vocab_size}: {plan.report.total_params / 1e9:.3f}B parameters",
        "", format_report(plan.report), "",
        f"training memory per GPU (GiB): {plan.gpus} GPU(s) of {plan.gpu_mem / GIB:.1f} GiB, "
        f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens, {dt}, AdamW",
        f"{'':<24}{'DDP':>10}{'FSDP2':>10}",
    ]
    for label, key in rows:
        lines.append(f"{label:<24}" + "".join(
            f"{getattr(plan.memory[s], key) / GIB:>10.2f}" for s in STRATEGIES))
    for ac in (False, True):
        lines.append(f"{'peak, AC' if ac else 'peak, no AC':<24}" + "".join(
            f"{plan.memory[s].peak(ac) / GIB:>10.2f}" for s in STRATEGIES))
        lines.append(f"{'  fits':<24}" + "".join(
            f"{'yes' if plan.fits(s, ac) else 'NO':>10}" for s in STRATEGIES))
    lines.append(f"(fits: peak <= {1 - plan.headroom:.0%} of the GPU memory; one block saves "
                 f"{plan.block_activations / GIB:.3f} GiB of activations)")
    fits = [ac for ac in (False, True) if plan.fits(plan.strategy, ac)]
    verdict = ("fits without activation checkpointing" if False in fits else
               "fits only with activation checkpointing" if fits else "does NOT fit")
    lines.append(f"{plan.strategy.upper()} on {plan.gpus} GPU(s): {verdict}")
    lines.append(f"packed inference size: i2 {plan.report.total_bytes('i2') / GIB:.3f} GiB, "
                 f"tq1 {plan.report.total_bytes('tq1') / GIB:.3f} GiB (FP16 model "
                 f"{plan.report.fp16_bytes / GIB:.3f} GiB)")
    return "\n".join(lines)
