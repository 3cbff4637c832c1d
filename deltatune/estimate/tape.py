"""The bookkeeping under the detailed activation model: tensors as sizes, and a tape that records every
allocation and release of a training step's walk (what is saved for backward, what is alive now, the
peak of each layer). `detailed.py` walks a model's layers on it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "deltatune")
LM_LOSSES = ("model", "chunked")


@dataclass(frozen=True)
class RunSettings:
    """One training step: batch, sequence and how the backbone computes."""

    batch_size: int
    seq_len: int
    """Real input tokens; prompt methods add their soft tokens to it."""
    activation_bytes: float
    """Bytes per activation element of the backbone (4 fp32, 2 bf16/fp16/k-bit compute)."""
    delta_bytes: float = 4
    """Bytes per element inside delta modules (peft runs LoRA in fp32 and casts its input to it)."""
    attention: str = "eager"
    """eager (scores of size seq² are saved), sdpa (a fused kernel saves only logsumexp) or deltatune (its
    explicit kernel: P saved below BLOCKWISE_MIN = T·Tk, nothing seq² above it; estimate/fastpath.py)."""
    gradient_checkpointing: bool | int = False
    """True: every layer; an int k: the k lowest layers (partial checkpointing, --gradient-checkpointing auto)."""
    device: str = "cuda"
    """cuda: bool dropout masks; cpu: float masks, and SDPA with dropout falls back to the eager math path."""
    generation: bool = True
    """Language-model loss over V logits per token; False: a classifier with num_labels outputs."""
    num_labels: int = 2
    lm_loss: str = "model"
    """model: transformers' loss over (T, V) logits; chunked: deltatune's LM head + loss over chunks of the
    labelled positions (fast/lm_loss.py)."""
    labelled_fraction: float = 1.0
    """Share of positions whose next token is labelled (an instruction row: its answer half)."""

    def checkpointed(self, index: int, layers: int) -> bool:
        """Does layer `index` (of `layers`) run checkpointed?"""
        if isinstance(self.gradient_checkpointing, bool):
            return self.gradient_checkpointing
        return index < min(self.gradient_checkpointing, layers)


@dataclass(frozen=True)
class Act:
    """A tensor of the forward pass: `rows` × `width` elements of `itemsize` bytes; same name = same storage."""

    name: str
    rows: float
    width: float
    itemsize: float
    grad: bool

    @property
    def nbytes(self) -> float:
        return self.rows * self.width * self.itemsize

    def derived(self, name: str, **changes: float | bool) -> Act:
        """A new tensor shaped like this one (rows kept unless changed)."""
        return replace(self, name=name, **changes)


@dataclass
class Tape:
    """Records the tensors autograd saves for backward, following PyTorch's rules (see module docstring), and
    the tensors alive beside them: `peak` is the most the walk ever held (saved + live)."""

    device: str
    saved: dict[str, float] = field(default_factory=dict)
    live: dict[str, float] = field(default_factory=dict)
    """Allocated, not saved, still referenced."""
    peak: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.saved.values())

    def _observe(self) -> None:
        self.peak = max(self.peak, self.total + sum(self.live.values()))

    def new(self, tensor: Act) -> Act:
        """An op allocates `tensor`; it stays alive until `free` (or for backward if kept)."""
        if tensor.name not in self.saved:
            self.live.setdefault(tensor.name, tensor.nbytes)
        self._observe()
        return tensor

    def free(self, *tensors: Act) -> None:
        """The last reference is dropped; a saved tensor stays for backward."""
        for tensor in tensors:
            self.live.pop(tensor.name, None)

    def free_all_but(self, *kept: Act, since: frozenset[str] = frozenset()) -> None:
        """A function returns: the tensors it allocated go (all but those alive when it was called, `since`),
        what it returns stays."""
        names = {t.name for t in kept} | since
        self.live = {name: size for name, size in self.live.items() if name in names}

    def scope(self) -> frozenset[str]:
        """The tensors alive when a function is called (for `free_all_but` when it returns)."""
        return frozenset(self.live)

    def keep(self, tensor: Act) -> None:
        self.live.pop(tensor.name, None)
        self.saved.setdefault(tensor.name, tensor.nbytes)
        self._observe()

    def linear(self, x: Act, name: str, out_features: int, weight_trains: bool, bias_trains: bool = False,
               rows: float | None = None) -> Act:
        """y = x·Wᵀ + b: keeps x only to form dW."""
        if weight_trains:
            self.keep(x)
        return self.new(Act(name, x.rows if rows is None else rows, out_features, x.itemsize,
                            x.grad or weight_trains or bias_trains))

    def product(self, a: Act, b: Act, name: str, rows: float, width: float) -> Act:
        """c = a·b (elementwise or matmul): da needs b, db needs a."""
        if b.grad:
            self.keep(a)
        if a.grad:
            self.keep(b)
        return self.new(Act(name, rows, width, a.itemsize, a.grad or b.grad))

    def scale(self, x: Act, name: str, vector_trains: bool) -> Act:
        """x · l with a per-channel vector l (IA3): dl needs x; dx needs l (a parameter)."""
        if vector_trains:
            self.keep(x)
        return self.new(x.derived(name, grad=x.grad or vector_trains))

    def softmax(self, scores: Act, name: str, itemsize: float) -> Act:
        """p = softmax(s) (or log-softmax): the backward uses the output p."""
        out = self.new(scores.derived(name, itemsize=itemsize))
        if scores.grad:
            self.keep(out)
        return out

    def dropout(self, x: Act, p: float) -> Act:
        """Keeps the mask; p = 0 is an identity (Llama's attention) and keeps nothing. Without grad the mask
        (CPU: a float noise tensor, input · noise) dies with the op."""
        if p <= 0:
            return x
        mask = self.new(x.derived(f"{x.name}.dropout_mask", itemsize=1 if self.device == "cuda" else x.itemsize))
        if x.grad:
            self.keep(mask)
        out = self.new(x.derived(f"{x.name}.dropped"))
        self.free(mask)
        return out

    def activation(self, x: Act, kind: str) -> Act:
        """Elementwise nonlinearity; what it keeps depends on how its derivative is written."""
        out = x.derived(f"{x.name}.{kind}")
        if kind == "gelu_new":  # 0.5·x·(1 + tanh(c·(x + 0.044715·x³))) in Python: x, tanh, 0.5x, 1 + tanh
            parts = [self.new(x.derived(f"{x.name}.gelu_new.{part}")) for part in ("tanh", "half_x", "one_plus_tanh")]
            if x.grad:
                for part in [x, *parts]:
                    self.keep(part)
            self.new(out)
            self.free(*parts)
            return out
        self.new(out)
        if x.grad:
            self.keep(out if kind in ("relu", "tanh") else x)  # gelu, silu: derivative evaluated at the input
        return out

    def layer_norm(self, x: Act, name: str, weight_trains: bool) -> Act:
        """native_layer_norm keeps x, mean and rstd (fp32) whenever any of its inputs needs grad."""
        out = self.new(x.derived(name, grad=x.grad or weight_trains))
        if out.grad:
            self.keep(x)
            self.keep(x.derived(f"{name}.mean_rstd", width=2, itemsize=4))
        return out

    def rms_norm(self, x: Act, name: str, weight_trains: bool, recompute: bool = False) -> Act:
        """LlamaRMSNorm: w · (x_fp32 · rsqrt(mean(x_fp32²) + ε)).to(dtype). `recompute` (the fast path's bf16
        norms, fast/recompute.py): the same forward temporaries, but it keeps only x and reruns in backward."""
        if recompute and x.grad:
            self.keep(x)
            return self.rms_norm(x.derived(x.name, grad=False), name, weight_trains=False).derived(name, grad=True)
        upcast = x if x.itemsize == 4 else self.new(x.derived(f"{x.name}.fp32", itemsize=4))
        squares = self.new(upcast.derived(f"{name}.squares"))   # pow(2), reduced by mean
        self.free(squares)
        normalized = self.new(upcast.derived(f"{name}.normalized_fp32"))
        if x.grad:
            self.keep(upcast)                                     # pow and mul keep it
            self.keep(x.derived(f"{name}.rsqrt", width=1, itemsize=4))
        if upcast is not x:
            self.free(upcast)
        cast = normalized if x.itemsize == 4 else self.new(x.derived(f"{name}.normalized"))
        if cast is not normalized:
            self.free(normalized)
        if weight_trains:
            self.keep(cast)                                       # w · x̂ keeps x̂ to form dw
        out = self.new(x.derived(name, grad=x.grad or weight_trains))
        self.free(cast)
        return out

    def fused_attention(self, q: Act, k: Act, v: Act, ctx: Act, logsumexp: Act) -> Act:
        """SDPA flash / memory-efficient kernels keep q, k, v, the output and logsumexp, nothing seq²."""
        self.new(ctx)
        self.new(logsumexp)
        if q.grad or k.grad or v.grad:
            for tensor in (q, k, v, ctx, logsumexp):
                self.keep(tensor)
        return ctx.derived(ctx.name, grad=q.grad or k.grad or v.grad)

    def add(self, branch: Act, skip: Act, name: str) -> Act:
        """branch + skip: an addition keeps nothing, its output is a new tensor."""
        return self.new(skip.derived(name, grad=branch.grad or skip.grad))
