"""Section 10, neural networks: softmax cross-entropy at vocabulary scale, perplexity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels.softmax import cross_entropy as _ce_kernel
from lossreg.validate import check_reduction

from ._common import acc_dtype as _wide

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


def validate_ce_extras(loss: str, input, softcap=None, shift=False, return_z_loss=False,
                       return_lse=False):
    """The options of issue 20 beyond torch's: softcap, shift, the returned extras."""
    if softcap is not None and (isinstance(softcap, bool) or not float(softcap) > 0):
        raise ValueError(f"{loss}: softcap must be None or a number > 0, got {softcap!r}")
    for name, v in (("shift", shift), ("return_z_loss", return_z_loss),
                    ("return_lse", return_lse)):
        if not isinstance(v, bool):
            raise ValueError(f"{loss}: {name} must be True or False, got {v!r}")
    if shift and input.shape[0] < 2:
        raise ValueError(f"{loss}: shift needs at least 2 rows (row i predicts target i+1), "
                         f"got {input.shape[0]}")


def softcapped(x, softcap):
    """c tanh(x / c) (Gemma 2's logit soft-capping); x itself when softcap is None."""
    return softcap * torch.tanh(x / softcap) if softcap else x


def _reduce_rows(rows, reduction, denom):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else _mean_over_kept(rows.sum(), denom)


def with_extras(out, lse, keep, denom, z_loss, reduction, return_z_loss, return_lse):
    """(loss, [z-loss part], [lse]): the z-loss part (z lse^2 per kept row) reduced like
    the loss (``mean``: over ``denom``, the kept rows' class weight), lse per row; both
    detached, in the loss's dtype. The loss alone when neither is asked for."""
    if not (return_z_loss or return_lse):
        return out
    lse = lse.detach()
    result = [out]
    if return_z_loss:
        rows = z_loss * lse * lse * keep
        result.append(_reduce_rows(rows, reduction, denom.detach()).to(out.dtype))
    if return_lse:
        result.append(lse.to(out.dtype))
    return tuple(result)


def _kept_denom(target, keep, weight, dtype):
    if weight is None:
        return keep.sum().to(dtype)
    return (weight.to(dtype)[torch.where(keep, target, 0)] * keep).sum()


def ce_reference(input, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                 z_loss=0.0, reduction="mean", softcap=None, shift=False, return_z_loss=False,
                 return_lse=False):
    """The formula, with torch's weighting, ignore_index and label-smoothing rules;
    ``shift`` scores row i against target i+1 (the last row dropped)."""
    validate_ce("cross_entropy", input, target, weight, ignore_index, label_smoothing, z_loss,
                reduction)
    validate_ce_extras("cross_entropy", input, softcap, shift, return_z_loss, return_lse)
    if shift:
        input, target = input[:-1], target[1:]
    n_cls = input.shape[1]
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16):  # half-precision log-softmax is lossy
        input = input.float()
    input = softcapped(input, softcap)
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
    out = _reduce_rows(loss, reduction, w_y.sum()).to(out_dtype)
    return with_extras(out, lse, keep, w_y.sum(), z_loss, reduction, return_z_loss,
                       return_lse)


def ce_torch(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
             reduction="mean", softcap=None, shift=False, return_z_loss=False,
             return_lse=False):
    """F.cross_entropy on the (soft-capped, row-shifted) logits, plus the z-loss term
    computed alongside when asked for (lse at least in float32)."""
    validate_ce("cross_entropy", input, target, weight, ignore_index, label_smoothing, z_loss,
                reduction)
    validate_ce_extras("cross_entropy", input, softcap, shift, return_z_loss, return_lse)
    if shift:
        input, target = input[:-1], target[1:]
    if softcap:  # tanh in float32 for 16-bit logits, the capped logits in their dtype
        input = softcapped(input.to(_wide(input.dtype)), softcap).to(input.dtype)
    out = F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction)
    if not (z_loss or return_z_loss or return_lse):
        return out
    keep = target != ignore_index
    wide = _wide(input.dtype)
    lse = torch.logsumexp(input.to(wide), dim=1)
    denom = _kept_denom(target, keep, weight, wide)
    if z_loss:
        out = out + _reduce_rows(z_loss * lse**2 * keep, reduction, denom).to(out.dtype)
    return with_extras(out, lse, keep, denom, z_loss, reduction, return_z_loss, return_lse)


def ce_triton(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
              reduction="mean", softcap=None, shift=False, return_z_loss=False,
              return_lse=False, inplace_backward=False):
    """The kernel over all N rows with the targets shifted (no copy of the logits; the
    last row ignored, dropped from ``none``); softcap applied by torch before it (a
    capped copy); lse for the returned extras from one more read of the logits."""
    validate_ce("cross_entropy", input, target, weight, ignore_index, label_smoothing, z_loss,
                reduction)
    validate_ce_extras("cross_entropy", input, softcap, shift, return_z_loss, return_lse)
    x = softcapped(input, softcap)
    y = torch.cat([target[1:], target.new_full((1,), ignore_index)]) if shift else target
    lse = None
    if return_z_loss or return_lse:  # read before an in-place kernel overwrites x
        x_rows = x[:-1] if shift else x
        lse = torch.logsumexp(x_rows.detach().to(_wide(x.dtype)), dim=1)
    out = _ce_kernel(x, y, weight, ignore_index, label_smoothing, z_loss, reduction,
                     inplace_backward and not softcap)
    if shift and reduction == "none":
        out = out[:-1]
    if lse is None:
        return out
    y = target[1:] if shift else y
    keep = y != ignore_index
    return with_extras(out, lse, keep, _kept_denom(y, keep, weight, lse.dtype), z_loss,
                       reduction, return_z_loss, return_lse)


def ce_triton_inplace(input, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                      z_loss=0.0, reduction="mean", softcap=None, shift=False,
                      return_z_loss=False, return_lse=False):
    """The Triton kernel writing the gradient over the logits (caller's consent); with
    softcap over the capped copy."""
    return ce_triton(input, target, weight, ignore_index, label_smoothing, z_loss, reduction,
                     softcap, shift, return_z_loss, return_lse, inplace_backward=True)


# ------------------------------------------------------------------ perplexity
def _validate_ppl(input, target, ignore_index):
    validate_ce("perplexity", input, target, ignore_index=ignore_index)


# Each takes exp of a mean loss at least in float32, then rounds once: exp of a 16-bit
# loss L is off by up to L u relative (L ~ 9, u = 2^-8: 3.5% in bfloat16), in the value
# and as a common factor of the whole gradient (the perplexity multiplies it).
def ppl_reference(input, target, ignore_index=-100):
    _validate_ppl(input, target, ignore_index)
    loss = ce_reference(input.to(_wide(input.dtype)), target, ignore_index=ignore_index)
    return torch.exp(loss).to(input.dtype)


def ppl_torch(input, target, ignore_index=-100):
    """F.cross_entropy's two steps, the log-softmax in float32 for 16-bit logits."""
    _validate_ppl(input, target, ignore_index)
    logp = F.log_softmax(input, dim=1, dtype=_wide(input.dtype))
    return torch.exp(F.nll_loss(logp, target, ignore_index=ignore_index)).to(input.dtype)


def ppl_triton(input, target, ignore_index=-100):
    _validate_ppl(input, target, ignore_index)
    loss = _ce_kernel(input, target, ignore_index=ignore_index, out_dtype=_wide(input.dtype))
    return torch.exp(loss).to(input.dtype)


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
    y = inputs[target][1:] if options.get("shift") else inputs[target]
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
                     "ignored the mean is NaN and the gradient zero, as in torch. `softcap` "
                     "c: logits c tanh(z / c) first (Gemma 2); `shift`: row i scored against "
                     "target i+1, the last row dropped (`none`: N-1 rows), no copy of the "
                     "logits; `return_z_loss` / `return_lse` return (loss, z-loss part, lse "
                     "per row) (the extras detached)."),
        citation=CITATION_CE, reference=ce_reference, make_inputs=make_inputs,
        options={"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.0,
                 "z_loss": 0.0, "softcap": None, "shift": False, "return_z_loss": False,
                 "return_lse": False},
        check_options=[{"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
                       {"z_loss": 1e-3, "label_smoothing": 0.05, "reduction": "none"},
                       {"softcap": 5.0, "z_loss": 1e-3}, {"shift": True, "reduction": "none"}],
        grad_inputs=("input",), sizes=SIZES, x_name="tokens", input_params=VOCAB,
        flops=_flops, edge_cases=CE_EDGE_CASES, mean_count=ce_mean_count,
    ))
    register(LossSpec(
        name="perplexity", family="neural_networks", title="Perplexity",
        input_domains={"target": ("index", lambda inputs: inputs["input"].shape[1])},
        formula=(r"\exp\Big(\frac{1}{|K|}\sum_{i\in K} -\log\mathrm{softmax}(z_i)_{y_i}\Big),"
                 r"\ K = \{i: y_i \ne \mathrm{ignore}\}"),
        description="exp of the mean token cross-entropy over kept tokens; a scalar, so no "
                    "reduction option. Every implementation takes exp of the mean loss in "
                    "at least float32 and rounds the perplexity once: exp of a loss L "
                    "already rounded to 16 bits is off by up to L u relative (3.5% in "
                    "bfloat16 at L = 9), in the value and as a common factor of the "
                    "gradient. So the perplexity is one rounding of a float32 value, and "
                    "its bfloat16 tolerance is narrower than the default (rtol 8e-3, two "
                    "unit roundoffs; the gradient elements are rounded once or twice): "
                    "the default 2e-2 would pass a 1% error, which a scalar output and a "
                    "gradient whose norm sits on the few target logits cannot show by a "
                    "fitted common factor. A float16 perplexity above 65504 is inf (the "
                    "verdict expects it); its gradient stays finite.",
        tolerances={"bfloat16": (8e-3, 4e-3)},
        citation="Jelinek et al. (1977)", reference=ppl_reference, make_inputs=make_inputs,
        options={"ignore_index": -100}, grad_inputs=("input",), sizes=SIZES, x_name="tokens",
        input_params=VOCAB, flops=_flops,
        edge_cases={k: CE_EDGE_CASES[k] for k in ("one_row", "equal_logits", "few_rows_split")},
    ))


@hookimpl
def register_implementations(register):
    triton = dict(backend="triton", devices=("cuda",), requires=("triton",),
                  grad_in_forward=True)
    register("cross_entropy", Impl(
        "torch", ce_torch, kind="baseline", dtypes=("float32", "float64", "bfloat16"),
        description="F.cross_entropy (+ z-loss term; softcap and shift by torch ops); not "
                    "float16: its mean sums the rows' losses (and, with label smoothing, "
                    "-log p over every class) in float16 before dividing, which overflows "
                    "to inf where the mean is finite (9 rows x 1000 classes at smoothing "
                    "0.1; rows of logits +-1e4)"))
    register("cross_entropy", Impl("triton", ce_triton, bytes_model=streamed("input"), **triton,
                                   description="online logsumexp, gradient in the forward"))
    register("cross_entropy", Impl("triton_inplace", ce_triton_inplace,
                                   bytes_model=streamed("input"), **triton,
                                   description="as triton, gradient written over the logits"))
    register("perplexity", Impl("torch", ppl_torch, kind="baseline",
                                description="exp(F.cross_entropy)"))
    register("perplexity", Impl("triton", ppl_triton, bytes_model=streamed("input"), **triton,
                                description="exp of the Triton cross-entropy"))
