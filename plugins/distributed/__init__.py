"""Distributed losses: vocabulary-parallel cross-entropy (plain and fused with the
classifier matmul) and CLIP's InfoNCE over a gathered batch.

Each runs over the process group of `lossreg.collectives.using` (or its ``group=``
argument) and, without one, as an ordinary loss on whole tensors, so the usual
`lossreg check`/`bench` judge them like any other. How inputs, outputs and gradients
lie over the ranks is in ``spec.sharding`` (a `lossreg.collectives.Sharding`), which
`lossreg.distributed.check_distributed` reads to check every rank's part against the
float64 single-process reference.
"""

from __future__ import annotations

import math

import torch

from lossreg import Impl, LossSpec, hookimpl
from lossreg.collectives import Sharding

from . import info_nce, linear_ce, vocab_ce

CE_OPTIONS = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "reduction": "mean"}
CE_CHECK_OPTIONS = [{"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
                    {"z_loss": 1e-3, "label_smoothing": 0.05, "reduction": "sum"}]
MEGATRON = ("Shoeybi et al. (2019), Megatron-LM: Training Multi-Billion Parameter Language "
            "Models Using Model Parallelism (vocab-parallel cross-entropy)")
CE_FORMULA = (r"\ell_i = (1-\varepsilon)(\mathrm{lse}_i - z_{i,y_i}) + \varepsilon(\mathrm{lse}_i"
              r" - \tfrac{1}{V}\textstyle\sum_v z_{iv}) + \lambda\,\mathrm{lse}_i^2,\ "
              r"\mathrm{lse}_i = M_i + \log\sum_r \sum_{v \in V_r} e^{z_{iv} - M_i},\ "
              r"M_i = \max_r \max_{v\in V_r} z_{iv}")


def _vocab_start(vocab_input, dim):
    def extra(inputs, rank, world, options):
        sizes = [len(c) for c in torch.arange(inputs[vocab_input].shape[dim]).tensor_split(world)]
        return {"vocab_start": sum(sizes[:rank])}

    return extra


def _targets(case, n, vocab):
    y = case.randint(0, vocab, n)
    drop = case.rand(n, dtype=torch.float32) < 0.1
    return torch.where(drop, torch.full_like(y, case.params.get("ignore_index", -100)), y)


def make_ce_inputs(case):
    vocab = case.params.get("vocab", 61)
    logits = case.randn(case.n, vocab, dtype=torch.float32) * case.params.get("spread", 3.0)
    y = _targets(case, case.n, case.params.get("target_vocab", vocab))
    return {"logits": logits.to(case.dtype), "target": y}


def make_linear_inputs(case):
    h, vocab = case.params.get("hidden", 8), case.params.get("vocab", 23)
    hidden = case.randn(case.n, h, dtype=torch.float32)
    weight = case.randn(vocab, h, dtype=torch.float32) * (2.0 / math.sqrt(h))
    y = _targets(case, case.n, case.params.get("target_vocab", vocab))
    return {"hidden": hidden.to(case.dtype), "weight": weight.to(case.dtype), "target": y}


def make_nce_inputs(case):
    dim = case.params.get("dim", 16)
    image = torch.nn.functional.normalize(case.randn(case.n, dim, dtype=torch.float32), dim=1)
    text = torch.nn.functional.normalize(
        image + 0.8 * case.randn(case.n, dim, dtype=torch.float32), dim=1)
    scale = math.log(case.params.get("inverse_temperature", 1 / 0.07))
    logit_scale = torch.tensor(scale, device=case.device) + 0.1 * case.randn(1)[0].float()
    return {"image": image.to(case.dtype), "text": text.to(case.dtype),
            "logit_scale": logit_scale.to(case.dtype)}


def _edge(make, n, **params):
    def edge(case):
        case.n = n
        case.params = {**case.params, **params}
        return make(case)

    return edge


def _all_ignored(make, n):
    def edge(case):
        case.n = n
        inputs = make(case)
        inputs["target"] = torch.full_like(inputs["target"], case.params.get("ignore_index",
                                                                            -100))
        return inputs

    return edge


def _kept(inputs, options):
    return float((inputs["target"] != options.get("ignore_index", -100)).sum())


def _linear_flops(inputs):
    n, h = inputs["hidden"].shape
    v = inputs["weight"].shape[0]
    return {"forward": 2 * n * h * v, "backward": 6 * n * h * v, "full": 8 * n * h * v}


def _nce_output(options):
    if not options.get("local_loss", False):
        return "replicate"
    return "split:0" if options.get("reduction") == "none" else "partial"


def _nce_scale_grad(options):
    return "partial" if options.get("local_loss", False) else "replicate"


def _specs():
    ce = LossSpec(
        name="vocab_parallel_cross_entropy", family="distributed",
        title="Vocabulary-parallel cross-entropy", formula=CE_FORMULA,
        description="Cross-entropy of logits split along the vocabulary over the ranks of a "
                    "process group (rank r holds columns vocab_start:vocab_start+V_r, every "
                    "rank all targets), with ignore_index, label smoothing and z-loss. "
                    "O(tokens) communication: the row max and the stacked (sum of exps, "
                    "target term) in two all-reduces. Without a process group it is the "
                    "ordinary loss. The vocabulary bound of the targets is checked in one "
                    "process only.",
        citation=MEGATRON, reference=vocab_ce.reference, make_inputs=make_ce_inputs,
        options=dict(CE_OPTIONS), check_options=CE_CHECK_OPTIONS, grad_inputs=("logits",),
        x_name="tokens",
        sizes={"quick": [37, 101], "default": [1024, 4096], "large": [8192, 32768]},
        input_params={"quick": {"vocab": 61}, "default": {"vocab": 16385},
                      "large": {"vocab": 128256}},
        mean_count=_kept,
        input_domains={"target": ("index", lambda inputs: inputs["logits"].shape[1])},
        edge_cases={
            "targets_in_first_shard": _edge(make_ce_inputs, 23, target_vocab=9),
            "all_ignored": _all_ignored(make_ce_inputs, 7),
            "vocab_of_three": _edge(make_ce_inputs, 11, vocab=3),
            "wide_logits": _edge(make_ce_inputs, 13, spread=40.0),
        },
    )
    ce.sharding = Sharding(inputs={"logits": "split:1"}, output="replicate",
                           grads={"logits": "split:1"}, extra=_vocab_start("logits", 1))
    yield ce
    linear = LossSpec(
        name="vocab_parallel_linear_cross_entropy", family="distributed",
        title="Vocabulary-parallel linear cross-entropy",
        formula=r"z = h W^\top,\ W = [W_0; \dots; W_{R-1}],\ " + CE_FORMULA,
        description="Cross-entropy of hidden @ weight.T with the hidden states on every rank "
                    "and the weight split by vocabulary rows; never the full logits, chunked "
                    "over tokens, each rank's weight gradient stays on it. The hidden states' "
                    "gradient is this rank's part (partial; Megatron's tensor-parallel "
                    "region all-reduces it).",
        citation=MEGATRON + "; Wijmans et al. (2024), Cut Your Losses in Large-Vocabulary "
                            "Language Models (chunked linear cross-entropy)",
        reference=linear_ce.reference, make_inputs=make_linear_inputs,
        options=dict(CE_OPTIONS), check_options=CE_CHECK_OPTIONS,
        grad_inputs=("hidden", "weight"), x_name="tokens",
        sizes={"quick": [37, 101], "default": [1024, 4096], "large": [8192, 16384]},
        input_params={"quick": {"hidden": 8, "vocab": 23},
                      "default": {"hidden": 512, "vocab": 16385},
                      "large": {"hidden": 4096, "vocab": 128256}},
        mean_count=_kept, flops=_linear_flops,
        input_domains={"target": ("index", lambda inputs: inputs["weight"].shape[0])},
        edge_cases={
            "targets_in_first_shard": _edge(make_linear_inputs, 19, target_vocab=5),
            "all_ignored": _all_ignored(make_linear_inputs, 5),
        },
    )
    linear.sharding = Sharding(inputs={"weight": "split:0"}, output="replicate",
                               grads={"hidden": "partial", "weight": "split:0"},
                               extra=_vocab_start("weight", 0))
    yield linear
    nce = LossSpec(
        name="gathered_info_nce", family="distributed",
        title="Gathered InfoNCE (CLIP)",
        formula=(r"\mathcal{L} = \frac{1}{2B}\sum_{i}\Big[\mathrm{lse}_j(s\,x_i^\top y_j) + "
                 r"\mathrm{lse}_j(s\,y_i^\top x_j) - 2 s\,x_i^\top y_i\Big],\ s = e^{t},\ "
                 r"x, y \text{ gathered over ranks}"),
        description="Symmetric InfoNCE of paired image/text embeddings over the global batch "
                    "(each rank its own rows, all-gathered with gradients), with a learnable "
                    "log inverse temperature logit_scale. local_loss scores only this rank's "
                    "rows and returns its share of the loss (the shares add up to the "
                    "whole loss). Pass normalized embeddings, as CLIP does. 16-bit "
                    "embeddings are gathered in their dtype and multiplied in float32, the "
                    "loss and gradients rounded once: at CLIP's largest inverse temperature "
                    "(100) 16-bit logits of +-100 keep about 0.05 (float16) or 0.4 "
                    "(bfloat16) of absolute precision, and logit_scale's gradient sums B^2 "
                    "cancelling products of probabilities and logits (5-7% off in "
                    "bfloat16). So the 16-bit tolerances are narrower than the defaults "
                    "(bfloat16 rtol 8e-3, two unit roundoffs; absolute floors 1e-5 / 1e-6), "
                    "which would pass a 1% error.",
        citation="Radford et al. (2021), Learning Transferable Visual Models From Natural "
                 "Language Supervision (CLIP); Ilharco et al. (2021), open_clip (ClipLoss)",
        reference=info_nce.reference, make_inputs=make_nce_inputs,
        options={"local_loss": False, "reduction": "mean"},
        check_options=[{"local_loss": True}, {"reduction": "sum"}, {"reduction": "none"},
                       {"local_loss": True, "reduction": "none"}],
        grad_inputs=("image", "text", "logit_scale"), x_name="batch",
        sizes={"quick": [9, 33], "default": [1024, 4096], "large": [16384, 32768]},
        input_params={"quick": {"dim": 16}, "default": {"dim": 512}, "large": {"dim": 1024}},
        tolerances={"float16": (2e-3, 1e-6), "bfloat16": (8e-3, 1e-5)},
        edge_cases={
            "batch_of_three": _edge(make_nce_inputs, 3),
            "sharp_temperature": _edge(make_nce_inputs, 10, inverse_temperature=100.0),
        },
    )
    nce.sharding = Sharding(inputs={"image": "split:0", "text": "split:0"}, output=_nce_output,
                            grads={"logit_scale": _nce_scale_grad})
    yield nce


@hookimpl
def register_losses(register):
    for spec in _specs():
        register(spec)


@hookimpl
def register_implementations(register):
    for loss, mod in (("vocab_parallel_cross_entropy", vocab_ce),
                      ("vocab_parallel_linear_cross_entropy", linear_ce),
                      ("gathered_info_nce", info_nce)):
        register(loss, Impl(name="torch", fn=mod.torch_impl, kind="baseline",
                            description=mod.torch_impl.__doc__ or ""))
        register(loss, Impl(name="fused", fn=mod.fused, description=mod.fused.__doc__ or ""))
