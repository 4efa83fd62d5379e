"""Transformer losses: causal LM, fused linear cross-entropy, MLM, seq2seq, InfoNCE,
KL distillation (with JSD), the jsd and tvd divergences and fused linear distillation."""

from __future__ import annotations

import torch

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed

from . import contrastive, distill, divergences, linear_ce, lm, mlm

TRITON = dict(backend="triton", devices=("cuda",), requires=("triton",))
CE_OPTIONS = {"ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean"}


def _lm_sizes(quick_vocab=300):
    return {"quick": [2, 5], "default": [4, 16], "large": [4, 16]}, {
        "quick": {"seq": 9, "vocab": quick_vocab}, "default": {"seq": 128, "vocab": 32000},
        "large": {"seq": 1024, "vocab": 131072}}


def _tokens_flops(inputs, key):
    nv = inputs[key].numel()
    return {"forward": 4 * nv, "backward": 6 * nv, "full": 10 * nv}


def _resize(make, n, **params):
    def edge(case):
        case.n = n
        case.params = {**case.params, **params}
        return make(case)

    return edge


def _with(make, **changes):
    def edge(case):
        inputs = make(case)
        inputs.update({k: f(case, inputs) for k, f in changes.items()})
        return inputs

    return edge


# quick sizes stay tiny: the test suite runs them through the Triton interpreter
LINEAR_SIZES = {"quick": [13, 40], "default": [256, 8192], "large": [4096, 16384]}
LINEAR_SHAPES = {"quick": {"hidden": 24, "vocab": 300},
                 "default": {"hidden": 1024, "vocab": 32000},
                 "large": {"hidden": 4096, "vocab": 128256}}


def _kept_count(key, shift=False):
    """``mean_count``: the tokens of ``inputs[key]`` not equal to ignore_index (-100 for
    losses without the option), or their class ``weight``s' sum when the inputs have
    one; ``shift`` drops the first position (causal LM targets)."""

    def count(inputs, options):
        y = inputs[key][:, 1:] if shift else inputs[key]
        keep = y != options.get("ignore_index", -100)
        w = inputs.get("weight") if key == "input_ids" else None
        if w is None:
            return float(keep.sum())
        return float((w[torch.where(keep, y, 0)] * keep).sum())

    return count


def _flce_mean_count(inputs, options):
    """The kept rows' class weight (their count without class weights); ``shift``
    scores row i against target i+1."""
    y = inputs["target"][1:] if options.get("shift") else inputs["target"]
    keep = y != options.get("ignore_index", -100)
    w = inputs.get("class_weight")
    if w is None:
        return float(keep.sum())
    return float((w[torch.where(keep, y, 0)] * keep).sum())


def _seq2seq_mean_count(inputs, options):
    """Token normalization divides by the real tokens; sequence normalization averages
    per-sequence means, which is no sum / count (None)."""
    if options.get("normalize", "token") != "token":
        return None
    return float(torch.count_nonzero(inputs["mask"]))


def _specs():
    lm_sizes, lm_shapes = _lm_sizes()
    yield LossSpec(
        name="causal_lm", family="transformers", title="Causal language-model loss",
        input_domains={"input_ids": ("index", lambda inputs: inputs["logits"].shape[-1])},
        formula=(r"\frac{1}{|K|}\sum_{(b,t)\in K} -\log\mathrm{softmax}(z_{b,t})_{x_{b,t+1}},"
                 r"\ K = \{(b,t): t < T-1,\ x_{b,t+1} \ne \mathrm{ignore}\}"),
        description="Next-token cross-entropy over (B, T, V) logits; the shift is done "
                    "inside, padding tokens equal ignore_index. `none` gives (B, T-1). "
                    "Options as cross_entropy (class `weight`, z-loss) plus `softcap` "
                    "(c tanh(z / c)); `return_z_loss` / `return_lse` return (loss, z-loss, "
                    "lse (B, T-1)) tuples, the loss including the z-loss.",
        citation="Radford et al. (2018); Bengio et al. (2003)",
        reference=lm.causal_reference, make_inputs=lm.make_causal_inputs,
        options={**CE_OPTIONS, "z_loss": 0.0, "softcap": None, "return_z_loss": False,
                 "return_lse": False},
        grad_inputs=("logits",), x_name="sequences",
        sizes=lm_sizes, input_params=lm_shapes,
        check_options=[{"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
                       {"z_loss": 1e-3, "softcap": 5.0, "reduction": "none"}],
        mean_count=_kept_count("input_ids", shift=True),
        flops=lambda i: _tokens_flops(i, "logits"),
        edge_cases={
            "two_tokens": _resize(lm.make_causal_inputs, 3, seq=2),
            "class_weighted": _with(lm.make_causal_inputs, weight=lambda c, i: (
                c.rand(i["logits"].shape[-1]) + 0.5)),
            "vocab_multi_block": _resize(lm.make_causal_inputs, 2, seq=5, vocab=8200),
            "all_padding_after_first": _with(
                _resize(lm.make_causal_inputs, 2, seq=6),
                input_ids=lambda c, i: torch.cat([i["input_ids"][:, :1], torch.full_like(
                    i["input_ids"][:, 1:], -100)], dim=1)),
        },
    )
    yield LossSpec(
        name="seq2seq", family="transformers", title="Sequence-to-sequence decoder loss",
        input_domains={
            "target": ("index", lambda inputs: inputs["logits"].shape[-1], (-100,)),
            "mask": ("values", (0, 1)),
        },
        formula=(r"\text{token: } \frac{\sum_{b,t} m_{bt}\,\ell_{bt}}{\sum_{b,t} m_{bt}},"
                 r"\quad \text{sequence: } \frac{1}{B}\sum_b \frac{\sum_t m_{bt}\,\ell_{bt}}"
                 r"{\max(1, \sum_t m_{bt})},\quad \ell_{bt} = \mathrm{CE}_\varepsilon(z_{bt}, y_{bt})"),
        description="Decoder token cross-entropy with a padding mask (1 = real token) and "
                    "label smoothing; `normalize` picks token or sequence averaging for "
                    "`mean`; `none` gives (B, T) with zeros at padding, `sum` the total.",
        citation="Sutskever et al. (2014); Szegedy et al. (2016) for label smoothing",
        reference=lm.seq2seq_reference, make_inputs=lm.make_seq2seq_inputs,
        options={"label_smoothing": 0.0, "normalize": "token", "reduction": "mean"},
        grad_inputs=("logits",), x_name="sequences", sizes=lm_sizes, input_params=lm_shapes,
        check_options=[{"normalize": "sequence"}, {"label_smoothing": 0.1},
                       {"reduction": "none"}, {"reduction": "sum"},
                       {"normalize": "sequence", "label_smoothing": 0.1}],
        mean_count=_seq2seq_mean_count,
        flops=lambda i: _tokens_flops(i, "logits"),
        edge_cases={"one_token_sequences": _resize(lm.make_seq2seq_inputs, 4, seq=1),
                    "vocab_multi_block": _resize(lm.make_seq2seq_inputs, 2, seq=3, vocab=8200)},
    )
    yield LossSpec(
        name="fused_linear_cross_entropy", family="transformers",
        input_domains={"target": ("index", lambda inputs: inputs["weight"].shape[0])},
        title="Fused linear cross-entropy",
        formula=(r"\mathrm{CE}\big(\mathrm{cap}(h W^\top + b),\ y\big),\quad"
                 r"\mathrm{cap}(z) = c\tanh(z / c)"),
        description="Cross-entropy of an LM head's logits without materializing the N x V "
                    "logits: chunks of rows, gradients of hidden, weight and bias computed "
                    "chunk by chunk during the forward. CE options as cross_entropy, class "
                    "weights as `class_weight` (V,); `softcap` c tanh(z / c) (Gemma 2); "
                    "`shift` scores row i against target i+1 (`none`: N-1 rows); "
                    "`return_z_loss` / `return_lse` return (loss, z-loss, lse) tuples "
                    "(the loss includes the z-loss); `accum_dtype` accumulates the weight "
                    "gradient (default float32 for a 16-bit weight).",
        citation="Wijmans et al. (2024) Cut Your Losses; Hsu et al. (2024) Liger-Kernel",
        reference=linear_ce.flce_reference, make_inputs=linear_ce.make_flce_inputs,
        options={**CE_OPTIONS, "z_loss": 0.0, "softcap": None, "shift": False,
                 "return_z_loss": False, "return_lse": False, "accum_dtype": None},
        grad_inputs=("hidden", "weight", "bias"), x_name="tokens", sizes=LINEAR_SIZES,
        input_params=LINEAR_SHAPES, flops=linear_ce.flce_flops,
        check_options=[{"reduction": "sum"}, {"reduction": "none"},
                       {"label_smoothing": 0.1, "z_loss": 1e-3}, {"softcap": 15.0},
                       {"shift": True}, {"shift": True, "reduction": "none"},
                       {"accum_dtype": "float64", "reduction": "sum"}],
        mean_count=_flce_mean_count,
        edge_cases={
            "bias": _with(linear_ce.make_flce_inputs,
                          bias=lambda c, i: c.randn(i["weight"].shape[0])),
            "one_row": _resize(linear_ce.make_flce_inputs, 1),
            "class_weighted": _with(linear_ce.make_flce_inputs, class_weight=lambda c, i: (
                c.rand(i["weight"].shape[0]) + 0.5)),
            "all_ignored": _with(_resize(linear_ce.make_flce_inputs, 9),
                                 target=lambda c, i: torch.full_like(i["target"], -100)),
        },
    )
    yield LossSpec(
        name="mlm", family="transformers", title="Masked language-model loss",
        input_domains={"labels": ("index", lambda inputs: inputs["weight"].shape[0], (-100,))},
        formula=(r"\frac{1}{|M|}\sum_{i\in M} -\log\mathrm{softmax}(W h_i)_{y_i},"
                 r"\ M = \{i: y_i \ne -100\}"),
        description="Cross-entropy of the LM head over masked positions only (labels -100 "
                    "elsewhere, ~15% masked). The optimized versions select the masked rows "
                    "before the vocabulary projection, then run fused linear cross-entropy.",
        citation="Devlin et al. (2019) BERT",
        reference=mlm.mlm_reference, make_inputs=mlm.make_mlm_inputs,
        options={"reduction": "mean"}, grad_inputs=("hidden", "weight"), x_name="tokens",
        sizes=LINEAR_SIZES, input_params=LINEAR_SHAPES,
        check_options=[{"reduction": "sum"}, {"reduction": "none"}],
        mean_count=_kept_count("labels"),
        flops=linear_ce.flce_flops,
        edge_cases={"one_masked": _with(
            _resize(mlm.make_mlm_inputs, 23),
            labels=lambda c, i: torch.where(torch.arange(23, device=c.device) == 7, 3, -100))},
    )
    yield LossSpec(
        name="info_nce", family="transformers", title="InfoNCE / NT-Xent",
        formula=(r"\frac{1}{B}\sum_i \tfrac12\Big[\Big(\mathrm{lse}_j S_{ij} - S_{ii}\Big)"
                 r" + \Big(\mathrm{lse}_j S_{ji} - S_{ii}\Big)\Big],\quad "
                 r"S_{ij} = \frac{\cos(u_i, v_j)}{\tau}"),
        description="Contrastive loss of two views with positives on the diagonal; "
                    "`symmetric` averages the row and column cross-entropies (else rows "
                    "only). The chunked and Triton versions never hold the B x B matrix. "
                    "Every implementation normalizes and multiplies 16-bit views in float32 "
                    "and rounds the loss and the gradients once (a unit vector rounded to "
                    "bfloat16 moves a logit by u / tau, 0.2 at tau = 0.02); so the 16-bit "
                    "tolerances are narrower than the defaults (bfloat16 rtol 8e-3, two "
                    "unit roundoffs; absolute floors 1e-5 / 1e-6, below a 1% error of the "
                    "mean's gradient elements at tau = 0.02), which would pass a 1% error.",
        tolerances={"bfloat16": (8e-3, 1e-5), "float16": (2e-3, 1e-6)},
        citation="van den Oord et al. (2018); Chen et al. (2020) SimCLR; Gao et al. (2021) "
                 "SimCSE",
        reference=contrastive.reference, make_inputs=contrastive.make_inputs,
        options={"temperature": 0.1, "symmetric": True, "reduction": "mean"},
        grad_inputs=("u", "v"), x_name="batch",
        sizes={"quick": [40, 130], "default": [4096, 16384], "large": [16384, 65536]},
        input_params={"quick": {"dim": 32}, "default": {"dim": 256}, "large": {"dim": 256}},
        check_options=[{"symmetric": False}, {"reduction": "none"}, {"reduction": "sum"},
                       {"temperature": 0.02}],
        flops=lambda i: {"forward": 2 * i["u"].shape[0] ** 2 * i["u"].shape[1],
                         "full": 8 * i["u"].shape[0] ** 2 * i["u"].shape[1]},
        edge_cases={"batch_of_one": _resize(contrastive.make_inputs, 1),
                    "identical_views": _with(contrastive.make_inputs,
                                             v=lambda c, i: i["u"].clone())},
    )
    kl_shapes = {"quick": {"vocab": 1000}, "default": {"vocab": 32000},
                 "large": {"vocab": 131072}}
    yield LossSpec(
        name="kl_distillation", family="transformers", title="KL / JSD distillation",
        formula=(r"T^2\,\mathrm{KL}\big(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T)\big)"
                 r"\ \text{(forward; reverse swaps; jsd: } T^2[\beta\,\mathrm{KL}(p\|m) + "
                 r"(1-\beta)\,\mathrm{KL}(q\|m)],\ m = \beta p + (1-\beta) q)"),
        description="Distillation of student logits s towards teacher logits t over the "
                    "vocabulary, per row, mean over rows (batchmean). The teacher gets no "
                    "gradient. float32 rtol 1e-4 (not 1e-5): the divergence is a small "
                    "difference of log-probabilities of size ~log V, whose float32 rounding "
                    "(~eps log V per row, one-signed after the batch mean) is 3.9e-5 of a "
                    "JSD with beta 0.9, T = 2 at V = 32000 in the float32 reference itself "
                    "and in F.kl_div (CPU run 20261126T155312Z).",
        tolerances={"float32": (1e-4, 5e-7)},
        citation="Hinton et al. (2015); Agarwal et al. (2024) GKD for the generalized JSD",
        reference=distill.kl_reference, make_inputs=distill.make_kl_inputs,
        options={"temperature": 1.0, "direction": "forward", "beta": 0.5, "reduction": "mean"},
        grad_inputs=("student",), x_name="tokens",
        sizes={"quick": [9, 33], "default": [512, 2048], "large": [4096, 16384]},
        input_params=kl_shapes,
        check_options=[{"direction": "reverse"}, {"direction": "jsd"},
                       {"direction": "jsd", "beta": 0.9, "temperature": 2.0},
                       {"temperature": 2.0, "reduction": "none"}, {"reduction": "sum"}],
        flops=lambda i: _tokens_flops(i, "student"),
        edge_cases={
            "vocab_multi_block": _resize(distill.make_kl_inputs, 3, vocab=8200),
            "extreme_student": _with(_resize(distill.make_kl_inputs, 5, vocab=300),
                                     student=lambda c, i: torch.where(
                                         c.rand(5, 300) < 0.5, 1e4, -1e4).to(i["student"].dtype)),
            "student_equals_teacher": _with(distill.make_kl_inputs,
                                            student=lambda c, i: i["teacher"].clone()),
        },
    )
    div_common = dict(
        family="transformers", make_inputs=divergences.make_inputs, grad_inputs=("student",),
        x_name="tokens", sizes={"quick": [9, 33], "default": [512, 2048],
                                "large": [4096, 16384]},
        input_params=kl_shapes, mean_count=divergences.kept_rows,
        input_domains={"labels": ("index", lambda inputs: inputs["student"].shape[1],
                                  (-100,))},
        flops=lambda i: _tokens_flops(i, "student"))
    def div_edges(make):
        return {
            "vocab_multi_block": _resize(make, 3, vocab=8200),
            "extreme_student": _with(_resize(make, 5, vocab=300),
                                     student=lambda c, i: torch.where(
                                         c.rand(5, 300) < 0.5, 1e4, -1e4).to(i["student"].dtype)),
            "student_equals_teacher": _with(make, student=lambda c, i: i["teacher"].clone()),
            "all_ignored": _with(make, labels=lambda c, i: torch.full_like(i["labels"], -100)),
            "no_labels": lambda case: {k: v for k, v in make(case).items() if k != "labels"},
        }
    yield LossSpec(
        name="jsd", title="Generalized Jensen-Shannon divergence",
        formula=(r"\frac{1}{|K|}\sum_{i\in K} \beta\,\mathrm{KL}(p_i\|m_i) + (1-\beta)\,"
                 r"\mathrm{KL}(q_i\|m_i),\ m_i = \beta p_i + (1-\beta) q_i,\ "
                 r"q_i = \mathrm{softmax}(s_i/T),\ p_i = \mathrm{softmax}(t_i/T)"),
        description="Generalized JSD between student (differentiated) and teacher softmaxes "
                    "per row, rows with labels == ignore_index skipped (labels optional). "
                    "beta = 0 is forward KL(p||q), beta = 1 reverse KL(q||p), as Liger-"
                    "Kernel defines them (the mixture form vanishes there). No T^2 factor. "
                    "float32 rtol 1e-4 for kl_distillation's reason (a small difference of "
                    "log-probabilities of size log V).",
        tolerances={"float32": (1e-4, 5e-7)},
        citation="Lin (1991) Divergence measures based on the Shannon entropy; Agarwal et "
                 "al. (2024) On-policy distillation (GKD); Hsu et al. (2024) Liger-Kernel",
        reference=divergences.jsd_reference,
        options={"beta": 0.5, "temperature": 1.0, "ignore_index": -100, "reduction": "mean"},
        check_options=[{"beta": 0.0}, {"beta": 1.0}, {"beta": 0.9, "temperature": 2.0},
                       {"reduction": "none"}, {"reduction": "sum"}],
        edge_cases=div_edges(divergences.make_inputs), **div_common)
    yield LossSpec(
        name="tvd", title="Total variation distance",
        formula=(r"\frac{1}{|K|}\sum_{i\in K} \tfrac12 \sum_c |p_{ic} - q_{ic}|,\ "
                 r"q_i = \mathrm{softmax}(s_i/T),\ p_i = \mathrm{softmax}(t_i/T)"),
        description="Total variation distance between student (differentiated) and teacher "
                    "softmaxes per row, rows with labels == ignore_index skipped (labels "
                    "optional); the subgradient of |x| at 0 is 0, as torch's abs. Its "
                    "inputs keep q and p apart by a relative 1e-4 (make_tvd_inputs): at a "
                    "tie within rounding either subgradient is right.",
        citation="Levin, Peres and Wilmer (2009) Markov Chains and Mixing Times, ch. 4; "
                 "Hsu et al. (2024) Liger-Kernel",
        reference=divergences.tvd_reference,
        options={"temperature": 1.0, "ignore_index": -100, "reduction": "mean"},
        check_options=[{"temperature": 2.0}, {"reduction": "none"}, {"reduction": "sum"}],
        edge_cases=div_edges(divergences.make_tvd_inputs),
        **{**div_common, "make_inputs": divergences.make_tvd_inputs})
    yield LossSpec(
        name="fused_linear_distillation", family="transformers",
        title="Fused linear distillation",
        formula=(r"T^2\,\mathrm{D}\big(\mathrm{softmax}(h^t W_t^\top/T),\ "
                 r"\mathrm{softmax}(h^s W_s^\top/T)\big),\ D \in \{\mathrm{KL},"
                 r"\mathrm{KL}^\top, \mathrm{JSD}_\beta\}"),
        description="kl_distillation from student and teacher hidden states and LM heads, "
                    "chunk by chunk: neither logit matrix is ever whole. Gradients go to "
                    "the student only.",
        citation="Hinton et al. (2015); Hsu et al. (2024) Liger-Kernel fused linear JSD",
        reference=distill.fld_reference, make_inputs=distill.make_fld_inputs,
        options={"temperature": 1.0, "direction": "forward", "beta": 0.5, "reduction": "mean"},
        grad_inputs=("student_hidden", "student_weight"), x_name="tokens",
        sizes={"quick": [13, 40], "default": [256, 4096], "large": [4096, 8192]},
        input_params={"quick": {"hidden": 24, "vocab": 300},
                      "default": {"hidden": 1024, "vocab": 32000},
                      "large": {"hidden": 4096, "vocab": 128256}},
        check_options=[{"direction": "reverse", "temperature": 2.0}, {"direction": "jsd"},
                       {"reduction": "none"}],
        flops=lambda i: {"forward": 4 * i["student_hidden"].numel() * i["student_weight"].shape[0],
                         "full": 8 * i["student_hidden"].numel() * i["student_weight"].shape[0]},
        edge_cases={"one_row": _resize(distill.make_fld_inputs, 1)},
    )


@hookimpl
def register_losses(register):
    for spec in _specs():
        register(spec)


@hookimpl
def register_implementations(register):
    register("causal_lm", Impl(
        "torch", lm.causal_torch, kind="baseline", dtypes=("float32", "float64", "bfloat16"),
        description="shifted view + F.cross_entropy; not float16, where F.cross_entropy's "
                    "mean sums in float16 and overflows (45 tokens x 300 classes at label "
                    "smoothing 0.1)"))
    register("causal_lm", Impl("triton", lm.causal_triton,
                               bytes_model=streamed("logits"), grad_in_forward=True, **TRITON,
                               description="cross_entropy kernel over the unshifted rows"))
    register("seq2seq", Impl("torch", lm.seq2seq_torch, kind="baseline",
                             description="F.cross_entropy per token + normalization"))
    register("seq2seq", Impl("triton", lm.seq2seq_triton,
                             bytes_model=streamed("logits", fused=False), **TRITON,
                             description="cross_entropy kernel"))
    register("fused_linear_cross_entropy", Impl(
        "torch", linear_ce.flce_torch, kind="baseline",
        description="full logits + F.cross_entropy"))
    register("fused_linear_cross_entropy", Impl(
        "chunked", linear_ce.flce_chunked, grad_in_forward=True,
        description="row chunks from a memory budget; eager CE per chunk"))
    register("fused_linear_cross_entropy", Impl(
        "triton", linear_ce.flce_triton,
        bytes_model=streamed("hidden", "weight", "bias"), grad_in_forward=True, **TRITON,
        description="row chunks; the Triton CE kernel turns each logit chunk into its "
                    "gradient in place"))
    register("mlm", Impl("selected", mlm.mlm_selected, grad_in_forward=True,
                         description="masked rows first, then chunked fused linear CE"))
    register("mlm", Impl("triton", mlm.mlm_triton,
                         bytes_model=streamed("hidden", "weight"), grad_in_forward=True, **TRITON,
                         description="masked rows first, then Triton fused linear CE"))
    register("info_nce", Impl("chunked", contrastive.chunked,
                              description="row blocks of S, online column logsumexp"))
    register("info_nce", Impl("triton", contrastive.triton_impl,
                              bytes_model=streamed("u", "v", fused=False), **TRITON,
                              description="logsumexps from the pairwise template"))
    register("kl_distillation", Impl("torch", distill.kl_torch, kind="baseline",
                                     description="F.kl_div on log-softmaxes"))
    register("kl_distillation", Impl("triton", distill.kl_triton,
                                     bytes_model=streamed("student"), grad_in_forward=True,
                                     **TRITON, description="one program per row, gradient "
                                                           "in the forward"))
    register("jsd", Impl("torch", divergences.jsd_torch, kind="baseline",
                         description="F.kl_div against the log-mixture"))
    register("jsd", Impl("triton", divergences.jsd_triton,
                         bytes_model=streamed("student"), grad_in_forward=True, **TRITON,
                         description="divergence kernel on the softmax template"))
    register("tvd", Impl("torch", divergences.tvd_torch, kind="baseline",
                         description="F.l1_loss of the softmaxes, halved"))
    register("tvd", Impl("triton", divergences.tvd_triton,
                         bytes_model=streamed("student"), grad_in_forward=True, **TRITON,
                         description="divergence kernel on the softmax template"))
    register("fused_linear_distillation", Impl(
        "chunked", distill.fld_chunked, grad_in_forward=True,
        description="row chunks of both logit blocks; eager divergence"))
    register("fused_linear_distillation", Impl(
        "triton", distill.fld_triton,
        bytes_model=streamed("student_hidden", "student_weight"), grad_in_forward=True, **TRITON,
        description="row chunks; Triton divergence kernel"))
