"""What a QAT run holds in memory, per device, before it runs: `qatlm memory MODEL --train`.

    qatlm memory gemma-3-4b --train --seq-len 4096 --batch-size 1 --precision bf16 --teacher sharded
    qatlm memory bundled --train --lora 16 --device-type cpu          # what `qatlm train` on this CPU holds

The plan follows what qatlm's training step allocates (qatlm.train.loop, kd_loss, topk_kd, student.fakequant),
counted tensor by tensor; the peak is the largest of four moments of a step:
  head      end of the forward: every saved activation, the fake-quant weight copies, the KD head's chunk
  head_bwd  the head's backward: its saved gradients and their scaled copies
  body_bwd  walking the layers backward: layer l's activations freed as its weight gradients appear
  optimizer AdamW's step: weights, gradients, 2 states and the step's temporaries
on top of what lives throughout (weights, teacher, AdamW states, cached casts). Facts of the code it encodes:
- Latent weights and the teacher are fp32 whatever the precision (bf16 is autocast: matmuls only).
- Each fake-quant Linear saves its fake-quantized weight for backward (fp32, or its bf16 cast), so a step holds a
  second copy of every layer matrix from its forward to its backward, and FSDP2 does not shard it (it is computed
  from the gathered weight). Activation checkpointing recomputes it layer by layer.
- Saved activations per token and layer are counted from what autograd saves in transformers' Gemma 3 and Llama
  blocks (`layer_activations`; checked exactly against torch's saved-tensor hooks in tests/test_train_memory.py).
  Gemma 3's sliding layers each save a [B, 1, T, T] mask (SDPA converts the boolean mask per layer) once T
  reaches the window.
- The KD head's working set in units of [chunk, vocab] fp32 (measured op by op on the eager path, which CUDA runs):
  8 with the teacher resident (its logits, two log-softmaxes, p_t, two temporaries, dz of the previous chunk), 4
  with a top-k cache (qatlm.train.topk_kd); +0.5 in bf16 (the bf16 logits beside their fp32 upcast).
- AdamW: on CUDA the foreach step makes one temporary of every trainable tensor; on CPU (per tensor) two of the
  largest.
- FSDP2 over N devices (qatlm.train.dist): weights, gradients and AdamW states 1/N, plus, unsharded, the root
  group for the whole step (embedding, final norm: the tied head lives there) and two gathered layers (the
  current one and the prefetched next); the root's unsharded gradient from the head's backward to the end of the
  backward. --teacher sharded shards the teacher the same way (its embedding joins the root group).
Activation checkpointing (--checkpointing) is a plan for a feature `qatlm train` does not have: per layer only
its input (fp32 residual) is saved, and the backward recomputes one layer at a time (measured with Hugging Face's
gradient_checkpointing_enable on the same student).

Not modelled: kernel scratch space, the CUDA context (~0.5-1 GB) and the caching allocator's fragmentation, which
is why a plan "fits" a GPU of --gpu-gb only with 5% to spare. Tokens/s are an estimate from a FLOP count at an
assumed sustained rate (--tflops), not a measurement.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .. import formats
from ..memory import ModelShapes, load_shapes
from ..gguf.plans import parse_plan

GB = 1e9
# the gradients of a layer's activations alive at once in its backward, as a fraction of what it saved
BWD_ACT_TMP = 0.1


@dataclass(frozen=True)
class TrainSetup:
    lora: int = 0  # LoRA rank (0: full QAT)
    devices: int = 1  # FSDP2 data-parallel devices
    seq_len: int = 256
    batch_size: int = 2  # sequences per device per micro-batch
    precision: str = "bf16"  # bf16 | fp32: the matmuls' dtype (latent weights stay fp32)
    checkpointing: bool = False  # activation checkpointing per decoder layer (planned; qatlm lacks it)
    teacher: str = "resident"  # resident | sharded | cache
    cache_k: int = 128  # teacher-cache entries per position
    kd_chunk: int = 128
    plan: str = "q4_0"
    train_embeddings: bool = True
    device_type: str = "cuda"  # cuda | cpu: which AdamW implementation runs

    def validate(self, vocab: int) -> "TrainSetup":
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if self.teacher not in ("resident", "sharded", "cache"):
            raise ValueError(f"--teacher must be resident, sharded or cache, got {self.teacher!r}")
        if self.devices < 1 or self.batch_size < 1 or self.seq_len < 8 or self.kd_chunk < 1 or self.lora < 0:
            raise ValueError("--devices, --batch-size and --kd-chunk must be >= 1, --seq-len >= 8, --lora >= 0")
        if self.teacher == "sharded" and self.devices < 2:
            raise ValueError("--teacher sharded needs --devices >= 2 (on one device the teacher is resident)")
        if self.teacher == "cache" and not 1 <= self.cache_k <= vocab:
            raise ValueError(f"--teacher-cache-k must be in [1, {vocab}] (the vocabulary), got {self.cache_k}")
        if self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"--device-type must be cuda or cpu, got {self.device_type!r}")
        return self


@dataclass
class Layer:
    params: int  # every tensor of the layer
    matrices: list[tuple[int, int, bool]]  # (rows, cols, fake-quantized) of each weight matrix
    sliding: bool


@dataclass
class Dims:
    arch: str
    hidden: int
    inter: int
    vocab: int
    q: int  # n_head * head_dim
    kv: int  # n_kv_head * head_dim
    n_head: int
    n_kv: int
    head_dim: int
    window: int | None
    tied: bool
    embed_fq: bool
    head_fq: bool
    layers: list[Layer]
    root_params: int  # embedding, final norm (and an untied head): FSDP2's root group
    params: int


def dims_of(s: ModelShapes, plan: str) -> Dims:
    """The numbers the plan needs, from a model's GGUF-named tensor shapes and the fake-quant plan."""
    if s.arch not in ACTIVATIONS:
        raise ValueError(f"{s.name}: no training-memory model for architecture {s.arch!r} (known: "
                         f"{', '.join(sorted(ACTIVATIONS))})")
    shape = {n: ne for n, ne, _ in s.tensors}
    try:
        types = parse_plan(plan).types([(n, ne, src if src in ("f32", "f16") else "f32") for n, ne, src in s.tensors])
    except ValueError as e:
        raise ValueError(f"{s.name}: {e}") from None
    hidden, vocab = shape["token_embd.weight"]
    layers = []
    for i in range(s.n_layer):
        own = [(n, ne) for n, ne in shape.items() if n.startswith(f"blk.{i}.")]
        sliding = (s.layer_types[i] == "sliding_attention" if s.layer_types else
                   bool(s.swa_pattern and s.sliding_window and (i + 1) % s.swa_pattern))
        layers.append(Layer(sum(math.prod(ne) for _, ne in own),
                            [(ne[1], ne[0], formats.is_format(types[n])) for n, ne in own if len(ne) == 2], sliding))
    q, kv = shape["blk.0.attn_q.weight"][1], shape["blk.0.attn_k.weight"][1]
    tied = "output.weight" not in shape
    root = sum(math.prod(shape[n]) for n in ("token_embd.weight", "output_norm.weight", "output.weight") if n in shape)
    return Dims(s.arch, hidden, shape["blk.0.ffn_up.weight"][1], vocab, q, kv, q // s.head_dim, s.n_kv_heads,
                s.head_dim, s.sliding_window, tied, formats.is_format(types["token_embd.weight"]),
                formats.is_format(types["token_embd.weight" if tied else "output.weight"]), layers, root,
                sum(math.prod(ne) for ne in shape.values()))


# ---- saved activations: bytes per token of one decoder layer, from what autograd saves ----------------------

def _rms_saves(h: int, frozen: bool = False) -> int:
    """An RMSNorm computed in fp32 (Gemma 3 and Llama alike): x [h], rsqrt(mean(x^2) + eps) [1] and, when its
    weight trains, x * rsqrt [h] (what the weight's gradient needs)."""
    return (4 if frozen else 8) * h + 4


def _linear_inputs(h: int, n: int, bf16: bool) -> int:
    """The input of n Linear layers reading the same fp32 tensor: fp32 it is saved once; under autocast each
    Linear saves its own bf16 cast (autocast caches casts of weights only)."""
    return 2 * h * n if bf16 else 4 * h


def _gemma3_layer(d: Dims, bf16: bool, frozen: bool = False) -> int:
    a = 2 if bf16 else 4
    h = d.hidden
    return (4 * _rms_saves(h, frozen)  # input, post-attention, pre-feedforward, post-feedforward norms
            + _linear_inputs(h, 3, bf16) + _linear_inputs(h, 2, bf16)  # q/k/v and gate/up inputs
            + (4 if frozen else 8) * (d.q + d.kv) + 4 * (d.n_head + d.n_kv)  # q_norm, k_norm per head (fp32)
            + 2 * a * d.q + 4 * d.n_head  # SDPA's q and output (= o_proj's input), fp32 logsumexp; k, v: _sdpa_kv
            + 4 * a * d.inter)  # gate, up, gelu(gate), gelu * up (= down's input)


def _llama_layer(d: Dims, bf16: bool, frozen: bool = False) -> int:
    a = 2 if bf16 else 4
    h = d.hidden
    return (2 * _rms_saves(h, frozen) + _linear_inputs(h, 3, bf16) + _linear_inputs(h, 2, bf16)
            + 2 * a * d.q + 4 * d.n_head + 4 * a * d.inter)  # the same SDPA and gated MLP, SiLU


ACTIVATIONS = {"gemma3": _gemma3_layer, "llama": _llama_layer, "qwen2": _llama_layer}  # Qwen2: Llama + biases


def layer_activations(d: Dims, layer: Layer, bf16: bool, tokens: int, seq_len: int, lora: bool = False,
                      first: bool = False) -> int:
    """Bytes one decoder layer saves for backward over `tokens` positions (batch x seq_len): the per-token
    tensors above, plus a sliding layer's SDPA mask [B, 1, T, T] (activation dtype) once T reaches the window.
    With LoRA the norms are frozen, and the first layer's input norm saves nothing (its input needs no grad)."""
    a = 2 if bf16 else 4
    masked = bool(layer.sliding and d.window and seq_len >= d.window)
    # SDPA's k and v: without a mask SDPA takes the grouped heads as they are (enable_gqa); with one transformers
    # repeats them to every query head (repeat_kv: an expand, then a reshape that is a view for one KV head and a
    # copy for more). Under autocast k (fp32 after the rotary embedding) is cast to bf16 at the query heads' size;
    # v (bf16 from v_proj) is saved as repeat_kv returns it
    one_kv = d.n_kv == 1
    kv = (a * ((d.q if bf16 or not one_kv else d.kv) + (d.kv if one_kv else d.q)) if masked
          else 2 * a * d.kv)
    per_token = ACTIVATIONS[d.arch](d, bf16, lora) + kv - (_rms_saves(d.hidden, True) if lora and first else 0)
    return per_token * tokens + (a * tokens * seq_len if masked else 0)


def weight_copies(layer: Layer, bf16: bool) -> int:
    """Bytes of the weights a layer's Linears save for backward: bf16: every matrix's bf16 cast; fp32: the
    fake-quantized output of a fake-quant Linear (a plain Linear saves the parameter itself)."""
    return sum(r * c * (2 if bf16 else 4 if fq else 0) for r, c, fq in layer.matrices)


# ---- the plan -----------------------------------------------------------------------------------------------

@dataclass
class TrainMemoryPlan:
    model: str
    setup: dict
    items: dict[str, int] = field(default_factory=dict)  # what lives throughout the step, bytes per device
    phases: dict[str, int] = field(default_factory=dict)  # the transient bytes of each moment, on top of items
    peak_bytes: int = 0
    peak_phase: str = ""
    trainable_params: int = 0
    flops_per_token: float = 0.0
    tokens_per_s: float | None = None  # per device, an estimate at tflops
    tflops: float | None = None
    gpu_gb: float | None = None
    fewest_devices: int | None = None  # of gpu_gb, for this setup with --devices free
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        s = self.setup
        unit, div = ("GB = 1e9", GB) if self.peak_bytes >= GB else ("MB = 1e6", 1e6)
        rows = [f"{self.model}  training memory per device ({unit} bytes): {s['precision']}, "
                f"{'LoRA r' + str(s['lora']) if s['lora'] else 'full QAT'}, {s['devices']} device(s), "
                f"{s['batch_size']} x {s['seq_len']} tokens per device, teacher {s['teacher']}"
                f"{', activation checkpointing (planned: qatlm lacks it)' if s['checkpointing'] else ''}"]
        rows += [f"  {k:<38} {v / div:>9.3f}" for k, v in self.items.items()]
        rows += [f"  + {k:<36} {v / div:>9.3f}" + ("   <- peak" if k == self.peak_phase else "")
                 for k, v in self.phases.items()]
        rows.append(f"  {'peak':<38} {self.peak_bytes / div:>9.3f}   trainable params {self.trainable_params:,}")
        if self.gpu_gb:
            fit = (f"{self.fewest_devices}" if self.fewest_devices else "none up to 1024 (see notes)")
            rows.append(f"  fewest {self.gpu_gb:g} GB devices that fit (FSDP2, 5% kept free): {fit}")
        if self.tokens_per_s:
            rows.append(f"  estimated tokens/s per device: {self.tokens_per_s:,.0f} ({self.flops_per_token / 1e9:.2f} "
                        f"GFLOP/token at an assumed {self.tflops:g} TFLOP/s sustained; an estimate, not a measurement)")
        rows += [f"  note: {n}" for n in self.notes]
        return "\n".join(rows)


def _plan_bytes(d: Dims, u: TrainSetup) -> tuple[dict[str, int], dict[str, int], int]:
    """(items, phases, trainable params) of one setup."""
    n_dev = u.devices
    fsdp = n_dev > 1
    bf16 = u.precision == "bf16"
    a = 2 if bf16 else 4
    tokens = u.batch_size * u.seq_len
    H, V = d.hidden, d.vocab
    VH = V * H
    lora = u.lora > 0
    head_trained = (not lora and u.train_embeddings) if d.tied else (not lora or d.head_fq)
    if lora:
        trainable = sum(u.lora * (r + c) for L in d.layers for r, c, fq in L.matrices if fq)
        trainable += 0 if d.tied or not d.head_fq else u.lora * (V + H)
        largest = max(max(u.lora * r, u.lora * c) for L in d.layers for r, c, fq in L.matrices if fq)
    else:
        trainable = d.params - (0 if u.train_embeddings else VH)
        largest = max(VH, max(r * c for L in d.layers for r, c, _ in L.matrices))
    root_trainable = d.root_params if not lora and u.train_embeddings else (0 if lora or d.tied else d.root_params - VH)
    layer_max = max(L.params for L in d.layers)

    items: dict[str, int] = {}
    # teacher
    if u.teacher == "resident":
        items["teacher weights (fp32)"] = 4 * d.params
    elif u.teacher == "sharded":
        items["teacher weights (fp32, 1/N)"] = 4 * d.params // n_dev
        items["teacher root group gathered"] = 4 * d.root_params
    else:
        items["teacher cache rows of the batch"] = tokens * (u.cache_k * (2 + 4) + 4)  # fp16 log-p, int32 id, rest
    if u.teacher != "cache" and bf16:
        items["teacher head bf16 cast (cached)"] = 2 * VH
    # student
    items["student latent weights (fp32" + (", 1/N)" if fsdp else ")")] = 4 * d.params // n_dev
    if fsdp:
        items["student root group gathered"] = 4 * d.root_params
        items["2 gathered layers (student + teacher)" if u.teacher == "sharded" else "2 gathered layers"] = \
            8 * layer_max * (2 if u.teacher == "sharded" else 1)
    items["AdamW states (2 x fp32" + (", 1/N)" if fsdp else ")")] = 8 * trainable // n_dev
    if not head_trained and d.head_fq:  # FakeQuantTiedHead / frozen_cast keep the frozen head's fake quant
        items["frozen head fake quant (cached)"] = 4 * VH + (2 * VH if bf16 else 0)
    elif not head_trained and bf16:
        items["frozen head bf16 cast (cached)"] = 2 * VH

    # activations and weight copies
    acts = [layer_activations(d, L, bf16, tokens, u.seq_len, lora, i == 0) for i, L in enumerate(d.layers)]
    copies = [weight_copies(L, bf16) for L in d.layers]
    rope_sets = 2 if d.arch == "gemma3" else 1  # Gemma 3: local and global rotary tables
    shared = tokens * (8 + _rms_saves(H, lora) + 4 * H) + rope_sets * 2 * u.seq_len * d.head_dim * 4  # ids, final norm, h_s
    if u.checkpointing:  # each layer keeps its input; one layer is recomputed at a time in the backward
        saved = [4 * H * tokens] * len(d.layers)
        recompute = max(x + c for x, c in zip(acts, copies))
    else:
        saved = [x + c for x, c in zip(acts, copies)]
        recompute = 0
    body = sum(saved) + shared
    h_t = 4 * H * tokens if u.teacher != "cache" else 0

    # the KD head (kd_loss._FusedHeadKD / topk_kd._FusedHeadTopK)
    c = min(u.kd_chunk, tokens)
    units = (8 if u.teacher != "cache" else 4) + (0.5 if bf16 else 0) - (0 if tokens > c else a / 4)
    head = int(units * c * V * 4) + 4 * H * tokens  # chunk working set + grad_h
    if u.teacher == "cache":  # the chunk's [c, k] rows: int64 ids, fp32 log-p, p, the student's log-q and products
        head += 32 * c * u.cache_k
    if head_trained:
        head += 4 * VH + (2 * VH if bf16 else 0) + 4 * VH  # fake_quant(W) fp32, its bf16 cast, grad_w fp32
    phases = {"activations + KD head": body + h_t + head}
    root_grad = 4 * root_trainable if fsdp else 0  # unsharded until the end of the backward
    phases["head backward"] = body + 8 * H * tokens + (8 * VH if head_trained else 0)
    # walking back through the layers: layer l's saved tensors, its gradients being formed (unsharded), those of
    # the layers after it (1/N once reduce-scattered), the head's gradient, and one weight gradient in flight
    g_layers = [4 * sum(u.lora * (r + c) for r, c, fq in L.matrices if fq) if lora else 4 * L.params
                for L in d.layers]
    biggest = max(r * c for L in d.layers for r, c, _ in L.matrices)
    bwd_tmp = biggest * (a + 8 if lora else a + 4 if bf16 else 4)  # dW in dtype, its fp32 cast (LoRA: x scale)
    head_grad = root_grad if fsdp else (4 * VH if head_trained else 0)
    grads_after, worst = 0, 0
    for i in reversed(range(len(d.layers))):
        live = sum(saved[:i + 1]) + recompute + grads_after + g_layers[i] + bwd_tmp + int(BWD_ACT_TMP * acts[i])
        worst = max(worst, live)
        grads_after += g_layers[i] // n_dev
    phases["body backward"] = worst + shared + head_grad
    embed_grad = 4 * VH if (not lora and u.train_embeddings) else 0  # the embedding's dense gradient, added in
    grads = 4 * trainable // n_dev
    phases["end of backward"] = grads + root_grad + embed_grad
    opt_tmp = 4 * trainable // n_dev if u.device_type == "cuda" else 8 * largest // (n_dev if fsdp else 1)
    phases["optimizer step"] = grads + opt_tmp
    return items, phases, trainable


def flops_per_token(d: Dims, u: TrainSetup) -> float:
    """Training FLOPs per token: 6 N for the student (forward and backward; the output projection included,
    N = the matrices' weights), + 2 N with checkpointing (the recomputed forward), 2 N for the teacher's forward,
    and causal attention (QK^T and AV: 2 x 2 x q x context / 2 per layer and token, windowed on sliding layers).
    LoRA trains less but still forms every weight's full gradient for its adapters (student.lora), so it counts
    as full QAT."""
    n = sum(r * c for L in d.layers for r, c, _ in L.matrices) + d.vocab * d.hidden
    att = sum(2 * d.q * (min(u.seq_len, d.window) if L.sliding and d.window else u.seq_len) for L in d.layers)
    student = (6 + (2 if u.checkpointing else 0)) * n + (3 + (1 if u.checkpointing else 0)) * att
    teacher = 2 * n + att if u.teacher != "cache" else 0
    return float(student + teacher)


def train_memory(model: str, setup: TrainSetup = TrainSetup(), gpu_gb: float | None = None,
                 tflops: float | None = None, shapes: ModelShapes | None = None) -> TrainMemoryPlan:
    """The training-memory plan of `model` (a shipped name, a GGUF file, a Hugging Face directory, 'bundled').

        >>> p = train_memory("gemma-3-1b", TrainSetup(seq_len=4096, batch_size=1), gpu_gb=80, tflops=400)
        >>> p.peak_bytes, p.fewest_devices, p.tokens_per_s
    """
    s = shapes or load_shapes(model)
    d = dims_of(s, setup.plan)
    u = setup.validate(d.vocab)
    items, phases, trainable = _plan_bytes(d, u)
    base = sum(items.values())
    peak_phase = max(phases, key=phases.get)
    plan = TrainMemoryPlan(s.name, asdict(u), items, phases, base + phases[peak_phase], peak_phase, trainable)
    plan.flops_per_token = flops_per_token(d, u)
    if tflops:
        if not tflops > 0:
            raise ValueError(f"--tflops must be > 0, got {tflops}")
        plan.tflops, plan.tokens_per_s = tflops, tflops * 1e12 / plan.flops_per_token
    if gpu_gb is not None:
        if not gpu_gb > 0:
            raise ValueError(f"--gpu-gb must be > 0, got {gpu_gb}")
        plan.gpu_gb = gpu_gb
        plan.fewest_devices = fewest_devices(d, u, gpu_gb)
        if plan.fewest_devices is None:
            floor = _peak(d, _with(u, devices=1 << 20))
            plan.notes.append(f"even sharded over any number of devices a device holds {floor / GB:.1f} GB (the parts "
                              "FSDP2 does not shard: activations, fake-quant weight copies, gathered groups"
                              + (", the resident teacher" if u.teacher == "resident" else "") + ")")
    if u.teacher == "resident" and u.devices > 1:
        plan.notes.append("the teacher is replicated on every device; --teacher sharded shards it (shard_teacher)")
    if u.teacher == "cache":
        plan.notes.append("teacher cache: the top-k logits are computed once beforehand (a teacher forward per "
                          "token, not counted here)")
    return plan


def _with(u: TrainSetup, **kw) -> TrainSetup:
    return TrainSetup(**{**asdict(u), **kw})


def _peak(d: Dims, u: TrainSetup) -> int:
    items, phases, _ = _plan_bytes(d, u)
    return sum(items.values()) + max(phases.values())


def fewest_devices(d: Dims, u: TrainSetup, gpu_gb: float, most: int = 1024) -> int | None:
    """The fewest devices (FSDP2; 1 = no sharding) on which the plan fits gpu_gb with 5% to spare."""
    for n in range(1, most + 1):
        if u.teacher == "sharded" and n == 1:
            continue
        if _peak(d, _with(u, devices=n)) <= 0.95 * gpu_gb * GB:
            return n
    return None
