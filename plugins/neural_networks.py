"""Section 10, neural networks: softmax cross-entropy at vocabulary scale, perplexity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels.softmax import cross_entropy as _ce_kernel
from lossreg.validate import check_reduction

CITATION_CE = "Shannon (1948); torch.nn.functional.cross_entropy; z-loss: Chowdhery et al. (2022)"


def validate_ce(loss: str, input, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                z_loss=0.0, reduction="mean"):
    """Shared by every implementation of cross_entropy (and the losses built on it)."""
    if not torch.is_tensor(input) or not input.is_floating_point() or input.dim() != 2:
        raise ValueError(f"{loss}: input must be a floating-point (N, C) tensor of logits, got "
                         f"{_describe(input)}")
    n_cls = input.shape[1]
    validate_targets(loss, target, input.shape[0], n_cls, input.device, ignore_index)
    if weight is not None and (not torch.is_tensor(weight) or weight.shape != (n_cls,)
                               or not weight.is_floating_point()):
        raise ValueError(f"{loss}: weight must be a floating-point tensor of shape ({n_cls},), "
                         f"got {_describe(weight)}")
    validate_ce_options(loss, label_smoothing, z_loss, reduction)


def validate_ce_options(loss: str, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{loss}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if float(z_loss) < 0:
        raise ValueError(f"{loss}: z_loss must be >= 0, got {z_loss}")
    check_reduction(loss, reduction)


def validate_targets(loss: str, target, n_rows: int, n_cls: int, device, ignore_index=-100,
                     name: str = "target", ref_name: str = "input"):
    """Class-index targets for n_rows rows of n_cls classes, on ``ref_name``'s device."""
    if not torch.is_tensor(target) or target.dtype not in (torch.int64, torch.int32) \
            or target.shape != (n_rows,):
        raise ValueError(f"{loss}: {name} must be an integer tensor of shape "
                         f"({n_rows},) holding class indices, got {_describe(target)}")
    if target.device != device:
        raise ValueError(f"{loss}: {name} must be on {ref_name}'s device {device}, got "
                         f"{target.device}")
    # Value checks need the data on the host: done for CPU tensors only, since on a GPU
    # they would sync every call (the Triton kernel turns such rows into NaN instead).
    if target.device.type == "cpu" and target.numel():
        kept = target[target != ignore_index]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n_cls):
            raise ValueError(f"{loss}: {name} values must be in [0, {n_cls}) or equal "
                             f"ignore_index={ignore_index}, got range [{int(kept.min())}, "
                             f"{int(kept.max())}]")


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _mean_over_kept(total: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """total / denom, with torch's convention when nothing is kept: a NaN loss whose
    gradient is zero (not the 0 * inf = NaN plain division would backpropagate)."""
    empty = denom == 0
    return total / torch.where(empty, torch.ones_like(denom), denom) + torch.where(
        empty, torch.full_like(denom, float("nan")), torch.zeros_like(denom))


def ce_reference(input, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                 z_loss=0.0, reduction="mean"):
    """The formula, with torch's weighting, ignore_index and label-smoothing rules."""
    validate_ce("cross_entropy", input, target, weight, ignore_index, label_smoothing, z_loss,
                reduction)
    n_cls = input.shape[1]
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16):  # half-precision log-softmax is lossy
        input = input.float()
    lse = torch.logsumexp(input, dim=1)
    logp = torch.log_softmax(input, dim=1)  # (x - max) - log-sum: exact at logits of 1e4
    keep = target != ignore_index
    y = torch.where(keep, target, torch.zeros_like(target))
    w = weight.to(input.dtype) if weight is not None else torch.ones(
        n_cls, dtype=input.dtype, device=input.device)
    w_y = w[y] * keep
    nll = -logp.gather(1, y[:, None]).squeeze(1) * w_y
    smooth = -(logp * w).sum(1) * keep
    loss = (1 - label_smoothing) * nll + label_smoothing / n_cls * smooth
    if z_loss:
        loss = loss + z_loss * lse**2 * keep
    if reduction == "none":
        return loss.to(out_dtype)
    if reduction == "sum":
        return loss.sum().to(out_dtype)
    return _mean_over_kept(loss.sum(), w_y.sum()).to(out_dtype)


def ce_torch(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
             reduction="mean"):
    """F.cross_entropy, plus the z-loss term computed alongside when asked for."""
    validate_ce("cross_entropy", input, target, weight, ignore_index, label_smoothing, z_loss,
                reduction)
    out = F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction)
    if not z_loss:
        return out
    keep = target != ignore_index
    # at least float32 (16-bit logits are widened, as the reference does); float64 stays
    wide = torch.float64 if input.dtype == torch.float64 else torch.float32
    z = z_loss * torch.logsumexp(input.to(wide), dim=1) ** 2 * keep
    if reduction == "none":
        return out + z.to(out.dtype)
    if reduction == "sum":
        return out + z.sum().to(out.dtype)
    y = torch.where(keep, target, torch.zeros_like(target))
    denom = (weight.to(wide)[y] * keep).sum() if weight is not None else keep.sum().to(wide)
    return out + _mean_over_kept(z.sum(), denom).to(out.dtype)


def ce_triton(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
              reduction="mean", inplace_backward=False):
    validate_ce("cross_entropy", input, target, weight, ignore_index, label_smoothing, z_loss,
                reduction)
    return _ce_kernel(input, target, weight, ignore_index, label_smoothing, z_loss,
                         reduction, inplace_backward)


def ce_triton_inplace(input, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                      z_loss=0.0, reduction="mean"):
    """The Triton kernel writing the gradient over the logits (caller's consent)."""
    return ce_triton(input, target, weight, ignore_index, label_smoothing, z_loss, reduction,
                     inplace_backward=True)


# ------------------------------------------------------------------ perplexity
def _validate_ppl(input, target, ignore_index):
    validate_ce("perplexity", input, target, ignore_index=ignore_index)


def ppl_reference(input, target, ignore_index=-100):
    _validate_ppl(input, target, ignore_index)
    return torch.exp(ce_reference(input, target, ignore_index=ignore_index))


def ppl_torch(input, target, ignore_index=-100):
    _validate_ppl(input, target, ignore_index)
    return torch.exp(F.cross_entropy(input, target, ignore_index=ignore_index))


def ppl_triton(input, target, ignore_index=-100):
    _validate_ppl(input, target, ignore_index)
    return torch.exp(ce_triton(input, target, ignore_index=ignore_index))


# ------------------------------------------------------------------ inputs
def make_inputs(case):
    """Logits (N, V) with a spread like a trained LM head's; ~10% of targets ignored."""
    vocab = int(case.params.get("vocab", 1000))
    ignore = int(case.params.get("ignore_index", -100))
    logits = case.randn(case.n, vocab) * 2.0
    target = case.randint(0, vocab, case.n)
    dropped = case.rand(case.n, dtype=torch.float32) < 0.1
    return {"input": logits, "target": torch.where(dropped, torch.full_like(target, ignore),
                                                   target)}


def _with(make, **changes):
    def edge(case):
        inputs = make(case)
        inputs.update({k: v(case, inputs) for k, v in changes.items()})
        return inputs

    return edge


def _sized(n, vocab):
    def make(case):
        case.n = n
        case.params = {**case.params, "vocab": vocab}
        return make_inputs(case)

    return make


def _weight(case, inputs):
    return case.rand(inputs["input"].shape[1]) + 0.5


CE_EDGE_CASES = {
    "one_row": _sized(1, 1000),
    "vocab_not_pow2_multi_block": _sized(5, 8193 + 17),
    "few_rows_split": _sized(3, 40000),
    "equal_logits": _with(_sized(9, 777), input=lambda c, i: torch.full_like(i["input"], 3.25)),
    "extreme_logits": _with(_sized(7, 513), input=lambda c, i: torch.where(
        c.rand(*i["input"].shape) < 0.5, 1e4, -1e4).to(i["input"].dtype)),
    "all_ignored": _with(_sized(6, 300), target=lambda c, i: torch.full_like(i["target"], -100)),
    "weighted": _with(_sized(33, 1000), weight=_weight),
}

SIZES = {"quick": [9, 33], "default": [512, 2048], "large": [4096, 16384]}
VOCAB = {"quick": {"vocab": 1000}, "default": {"vocab": 32000}, "large": {"vocab": 131072}}


def _flops(inputs):
    nv = inputs["input"].numel()
    return {"forward": 4 * nv, "backward": 6 * nv, "full": 10 * nv}


def ce_mean_count(inputs, options, target="target"):
    """What ``mean`` divides by: the total class weight of the kept (not ignored) rows."""
    y = inputs[target]
    kept = y[y != options.get("ignore_index", -100)]
    weight = inputs.get("weight")
    return float(kept.numel() if weight is None else weight[kept].sum())


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="cross_entropy", family="neural_networks", title="Softmax cross-entropy",
        input_domains={"target": ("index", lambda inputs: inputs["input"].shape[1])},
        formula=(r"\ell_i = (1-\varepsilon)\,w_{y_i}\,(\mathrm{lse}(z_i) - z_{i,y_i})"
                 r" + \frac{\varepsilon}{C}\sum_c w_c(\mathrm{lse}(z_i) - z_{i,c})"
                 r" + \lambda\,\mathrm{lse}(z_i)^2,\quad "
                 r"L = \frac{\sum_{i: y_i \ne \mathrm{ignore}} \ell_i}"
                 r"{\sum_{i: y_i \ne \mathrm{ignore}} w_{y_i}}"),
        description=("Softmax cross-entropy over C classes up to LLM vocabularies, with torch's "
                     "weight / ignore_index / label_smoothing semantics and an optional z-loss "
                     "(lambda lse^2 per kept row, reduced like the loss). With every target "
                     "ignored the mean is NaN and the gradient zero, as in torch."),
        citation=CITATION_CE, reference=ce_reference, make_inputs=make_inputs,
        options={"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.0,
                 "z_loss": 0.0},
        check_options=[{"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
                       {"z_loss": 1e-3, "label_smoothing": 0.05, "reduction": "none"}],
        grad_inputs=("input",), sizes=SIZES, x_name="tokens", input_params=VOCAB,
        flops=_flops, edge_cases=CE_EDGE_CASES, mean_count=ce_mean_count,
    ))
    register(LossSpec(
        name="perplexity", family="neural_networks", title="Perplexity",
        input_domains={"target": ("index", lambda inputs: inputs["input"].shape[1])},
        formula=(r"\exp\Big(\frac{1}{|K|}\sum_{i\in K} -\log\mathrm{softmax}(z_i)_{y_i}\Big),"
                 r"\ K = \{i: y_i \ne \mathrm{ignore}\}"),
        description="exp of the mean token cross-entropy over kept tokens; a scalar, so no "
                    "reduction option.",
        citation="Jelinek et al. (1977)", reference=ppl_reference, make_inputs=make_inputs,
        options={"ignore_index": -100}, grad_inputs=("input",), sizes=SIZES, x_name="tokens",
        input_params=VOCAB, flops=_flops,
        edge_cases={k: CE_EDGE_CASES[k] for k in ("one_row", "equal_logits", "few_rows_split")},
    ))


@hookimpl
def register_implementations(register):
    triton = dict(backend="triton", devices=("cuda",), requires=("triton",),
                  grad_in_forward=True)
    register("cross_entropy", Impl("torch", ce_torch, kind="baseline",
                                   description="F.cross_entropy (+ z-loss term)"))
    register("cross_entropy", Impl("triton", ce_triton, bytes_model=streamed("input"), **triton,
                                   description="online logsumexp, gradient in the forward"))
    register("cross_entropy", Impl("triton_inplace", ce_triton_inplace,
                                   bytes_model=streamed("input"), **triton,
                                   description="as triton, gradient written over the logits"))
    register("perplexity", Impl("torch", ppl_torch, kind="baseline",
                                description="exp(F.cross_entropy)"))
    register("perplexity", Impl("triton", ppl_triton, bytes_model=streamed("input"), **triton,
                                description="exp of the Triton cross-entropy"))
