"""What a method adds to a model, in the terms the memory estimator needs: trainable
parameters, which base weights it stores in 4 bits, and what extra tensors its forward pass
saves for backward.

The method files build modules; they do not predict them. The closed forms of their structure
live here, one function ``(Architecture, fields) → MethodPlan`` per method, and
:data:`peftlab.select.models.MODELS` names which one a method uses and which config fields it
reads. Unit tests check every closed form against ``peftlab.trainable_parameters`` after
``peftlab.apply`` on tiny models.

Counts (``d`` = hidden, ``L`` = layers; "linears" = targeted linear layers):

- ``full``: every parameter (minus the input embedding with ``freeze_embeddings``).
- ``lora`` / ``qlora``: ``Σ_linears r·(in + out)``; ``dora`` / QDoRA add ``out`` per linear (the
  magnitude vector).
- ``adapter``: per adapter ``d·m + m + m·d + d`` (down and up with biases, ``d`` the adapted
  layer's output width), ``m = d // 16`` by default; Houlsby places 2 per block, Pfeiffer 1.
- ``prefix`` (``reparam``): embedding ``p·d`` + MLP ``d·H + H + H·W + W`` with
  ``W = L·2·n_kv·d_head`` and ``H = reparam_hidden``; without reparam (``ptuning-v2``) the table
  ``p·W``.
- ``prompt``: ``p·d``.
- ``ia3``: ``Σ_linears out`` (a vector on the output) or ``in`` (on a feed-forward layer's
  input); the default targets are the method's own table (:data:`peftlab.methods.ia3.DEFAULTS`)
  under the family's name (``llama``: k, v, down; ``bert``: key, value, output.dense) — a
  Qwen2 preset is counted with Llama's k_proj where peft's default takes q_proj.
- ``vera``: ``Σ_linears (out + r)`` (the vectors b and d); the shared frozen pair adds
  ``r·(max_in + max_out)`` to the weights.
- Every method also trains a classification model's new head (:func:`trains_head`).

Targets are matched as ``peftlab.apply`` matches them: :func:`peftlab.core.matching.matches_target`
over the qualified names of the architecture's linear layers
(:meth:`~peftlab.select.presets.Architecture.named_linears`), each block counted on its own.
Adapter sites follow the bottleneck adapter's own placement rule
(:func:`peftlab.methods.adapter.block_outputs`) run on the architecture's block description.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from peftlab.core.config import ConfigError
from peftlab.core.matching import ALL_LINEAR, check_regex, is_head_name, matches_target
from peftlab.methods import _lora_patterns as _patterns
from peftlab.methods.adapter import AdapterConfig, adapted_outputs, block_outputs
from peftlab.methods.ia3 import DEFAULTS as IA3_DEFAULTS
from peftlab.methods.ia3 import IA3Config, feedforward_names, resolve_modules
from peftlab.select.presets import BLOCKS, INPUT_EMBEDDING, Architecture

Shape = tuple[int, int, bool]
"""A linear layer's ``(in, out, has_bias)``."""


@dataclasses.dataclass
class MethodPlan:
    """What a method does to a model, in the terms the estimator needs."""

    method: str
    trainable: int
    """Trainable parameters."""
    targets: dict[str, int]
    """Per-block linear suffix → low-rank r (0: trained in full by ``full``)."""
    dora: bool = False
    quantized: int = 0
    """Base weights stored in 4 bits."""
    quant_bits: float = 16.0
    """Bits per quantized weight, constants included."""
    adapters: list[str] = dataclasses.field(default_factory=list)
    """Per-block linear suffixes whose output passes a bottleneck adapter."""
    bottleneck: int = 0
    adapter_act_saves: int = 1
    """Tensors of width m the adapter activation saves (ReLU/Tanh: its output; GELU/SiLU: input and output)."""
    kv_extra: int = 0
    """Virtual key/value positions every layer attends to (prefix, P-Tuning v2)."""
    seq_extra: int = 0
    """Virtual tokens prepended to the input sequence (prompt tuning)."""
    prefix_mlp_hidden: int = 0
    """Hidden width of the prefix reparameterization MLP (0: none)."""
    head_trainable: bool = False
    """The output head trains: ``full``, or a classification model's new head under any other
    method (:func:`trains_head`)."""
    norms_trainable: bool = False
    embeddings_trainable: bool = False
    upcast_non_quantized: bool = False
    """QLoRA casts every 16-bit parameter outside the 4-bit layers to float32 (and so the
    hidden states run in float32)."""
    checkpointing: bool = False
    mergeable: bool = False
    """The update folds into the base weights (no inference overhead once merged);
    :func:`peftlab.select.models.plan` sets it from the config class's ``mergeable``."""
    trains_base: bool = False
    """The base weights themselves train (``full``): the method adds no parameters, and its
    largest trainable tensor is the largest base weight."""
    inference_extra_params: int = 0
    """Parameters still present at inference (adapters; folded prefix table; soft prompt)."""
    scaled: dict[str, str] = dataclasses.field(default_factory=dict)
    """Per-block linear suffix → ``"out"`` or ``"in"``: the side an IA³ vector rescales."""
    dense_deltas: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per-block linear suffix → weight-sized (in × out) tensors the method builds in every
    forward and autograd keeps for backward (LoHa and LoKr: the update ΔW itself)."""
    projected: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per-block linear suffix → width of a frozen projection's output that autograd keeps per
    token for a trained vector's gradient, the layer input not kept (VeRA: ``A·x``, r wide,
    for ``d``; its ``b`` is an output vector, in :attr:`scaled`)."""
    frozen_extra: int = 0
    """Frozen elements the method adds beside the base weights (VeRA's shared projection
    pair): weights memory, neither trained nor part of the merged model."""
    embedding_adapted: bool = False
    """A LoRA on the input embedding table: its output (so block 0's input) needs a gradient."""
    head_adapted: bool = False
    """The method replaces a causal LM's output head (LoRA/QLoRA/an adapter targeting
    ``lm_head``), so the chunked loss cannot serve it and the trainer uses the plain loss."""


def target_linears(
    arch: Architecture, target_modules: Any, embeddings: bool = False
) -> dict[str, Shape]:
    """The linear layers of ``arch`` that ``target_modules`` selects, by qualified name, with
    ``peftlab.apply``'s rules (``"all-linear"`` leaves the output head out); with
    ``embeddings`` (LoRA, QLoRA) the input embedding too when named, as ``(vocab, hidden)``.

    Raises:
        ConfigError: an invalid regex, or a target (a list entry) that matches no linear layer.
    """
    linears = arch.named_linears()
    if embeddings and target_modules != ALL_LINEAR:
        linears[INPUT_EMBEDDING[arch.family]] = (arch.vocab, arch.hidden, False)
    per_block = ", ".join(arch.linear_shapes())
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            check_regex(target_modules)
        found = {
            n: s
            for n, s in linears.items()
            if matches_target(n, target_modules, head=is_head_name(n))
        }
        if not found:
            raise ConfigError(
                f"target_modules={target_modules!r} matches no linear layer of {arch.name}; its "
                f"per-block linear layers are: {per_block}"
            )
        return found
    found = {}
    for entry in target_modules:
        hits = {n: s for n, s in linears.items() if matches_target(n, [entry])}
        if not hits and matches_target(INPUT_EMBEDDING[arch.family], [entry]):
            raise ConfigError(
                f"target module {entry!r} is {arch.name}'s embedding table, which only LoRA and "
                f"QLoRA (without use_dora) adapt; leave it out of target_modules"
            )
        if not hits:
            raise ConfigError(
                f"target module {entry!r} matches no linear layer of {arch.name}; its per-block "
                f"linear layers are: {per_block}"
            )
        found.update(hits)
    return found


def block_suffixes(arch: Architecture, names: Any) -> list[str]:
    """The per-block suffixes (``self_attn.q_proj``) of the block layers among ``names``, in
    :meth:`~peftlab.select.presets.Architecture.linear_shapes` order; layers outside the
    blocks are left out."""
    prefix = BLOCKS[arch.family] + "."
    inside = {n[len(prefix) :].partition(".")[2] for n in names if n.startswith(prefix)}
    return [s for s in arch.linear_shapes() if s in inside]


def adapter_sites(arch: Architecture, placement: str) -> dict[str, Shape]:
    """The layers ``peftlab.apply`` puts a bottleneck adapter after, by qualified name: the
    adapter's placement rule run on ``arch``'s block description.

    Raises:
        ConfigError: the rule finds no single attention / feed-forward output in a block.
    """
    shapes = arch.linear_shapes()
    children = list(dict.fromkeys(s.split(".")[0] for s in shapes))
    linears = [(s, i, o) for s, (i, o, _) in shapes.items()]
    picked = adapted_outputs(*block_outputs(children, linears, arch.hidden), placement)
    if picked is None:
        raise ConfigError(
            f"placement={placement!r}: {arch.name} has no single attention and feed-forward "
            f"output projection per block; pass target_modules"
        )
    prefix = BLOCKS[arch.family]
    return {f"{prefix}.{k}.{s}": shapes[s] for k in range(arch.layers) for s in picked}


def trains_head(arch: Architecture, f: dict) -> bool:
    """Whether a classification model's new head trains, by the rule ``peftlab.apply`` follows
    for every method: ``modules_to_save=None`` trains the head (the ``classifier``/``score``
    child of a ``*ForSequenceClassification`` model), ``[]`` opts out, a list trains the
    modules it names (counted here when one of them is the head). A language model has no new
    head."""
    if arch.classifier is None:
        return False
    saved = f.get("modules_to_save")
    if saved is None:
        return True
    return matches_target(arch.classifier, [saved] if isinstance(saved, str) else list(saved))


def adapts_head(names: Any) -> bool:
    """Whether ``names`` (the layers a method replaces) include the model's output head."""
    return any(is_head_name(n) for n in names)


def trained_head_params(arch: Architecture, f: dict) -> int:
    """Parameters of the head :func:`trains_head` trains (0: none)."""
    return arch.classifier_params() if trains_head(arch, f) else 0


def full_plan(arch: Architecture, f: dict) -> MethodPlan:
    """Every base parameter trains (the input embedding stays frozen with
    ``freeze_embeddings``)."""
    frozen = arch.vocab * arch.hidden if f["freeze_embeddings"] else 0
    return MethodPlan(
        "full",
        arch.total_params() - frozen,
        dict.fromkeys(arch.linear_shapes(), 0),
        head_trainable=True,
        norms_trainable=True,
        embeddings_trainable=not f["freeze_embeddings"],
        trains_base=True,
    )


def lowrank_plan(name: str, arch: Architecture, f: dict, dora: bool = False) -> MethodPlan:
    """Low-rank adapters (LoRA, DoRA): ``r·(in + out)`` per targeted linear, plus ``out`` (the
    magnitude) with ``dora``."""
    found = target_linears(arch, f["target_modules"], embeddings=not dora)
    keys = ("r", "rank_pattern", "layers_to_transform", "layers_pattern")
    cfg = SimpleNamespace(**{k: f.get(k) for k in keys})
    found = {n: found[n] for n in _patterns.kept_layers(cfg, list(found))}
    ranks = {n: _patterns.module_rank(cfg, n) for n in found}
    lowrank = sum(ranks[n] * (i + o) + (o if dora else 0) for n, (i, o, _) in found.items())
    head = trained_head_params(arch, f)
    return MethodPlan(
        name,
        lowrank + head,
        _mean_block_ranks(arch, ranks),
        dora=dora,
        head_trainable=trains_head(arch, f),
        head_adapted=adapts_head(found),
        embedding_adapted=INPUT_EMBEDDING[arch.family] in found,
    )


def _mean_block_ranks(arch: Architecture, ranks: dict[str, int]) -> dict[str, float]:
    """Per-block suffix → its rank summed over the blocks / the block count: the rank each
    block's layer has when they share one (``rank_pattern`` and ``layers_to_transform`` make
    it a mean, which keeps per-layer sums exact: the estimator multiplies by the blocks)."""
    prefix = BLOCKS[arch.family] + "."
    out = dict.fromkeys(block_suffixes(arch, ranks), 0.0)
    for n, r in ranks.items():
        if n.startswith(prefix):
            out[n[len(prefix) :].partition(".")[2]] += r / arch.layers
    return {s: int(v) if float(v).is_integer() else v for s, v in out.items()}


def loha_plan(arch: Architecture, f: dict) -> MethodPlan:
    """LoHa: ``2r·(in + out)`` per targeted linear; its input is saved (for the update's
    gradient) and one dense ``[out, in]`` tensor per layer, the update itself (its backward
    recomputes the two products from the factors; see peftlab/methods/loha.py)."""
    r = int(f["r"])
    found = target_linears(arch, f["target_modules"])
    trainable = sum(2 * r * (i + o) for i, o, _ in found.values())
    suffixes = block_suffixes(arch, found)
    return MethodPlan(
        "loha",
        trainable + trained_head_params(arch, f),
        dict.fromkeys(suffixes, 0),
        dense_deltas=dict.fromkeys(suffixes, 1),
        head_trainable=trains_head(arch, f),
        head_adapted=adapts_head(found),
    )


def lokr_plan(arch: Architecture, f: dict) -> MethodPlan:
    """LoKr: its factors' sizes per targeted linear (peftlab/methods/lokr.py); its input is
    saved and one dense ``[out, in]`` update per layer."""
    from peftlab.methods.lokr import LoKrConfig, factor_shapes

    cfg = LoKrConfig(**{k: f[k] for k in ("r", "decompose_both", "decompose_factor")})
    found = target_linears(arch, f["target_modules"])
    trainable = 0
    for i, o, _ in found.values():
        trainable += sum(a * b for a, b in factor_shapes(cfg, i, o).values())
    suffixes = block_suffixes(arch, found)
    return MethodPlan(
        "lokr",
        trainable + trained_head_params(arch, f),
        dict.fromkeys(suffixes, 0),
        dense_deltas=dict.fromkeys(suffixes, 1),
        head_trainable=trains_head(arch, f),
        head_adapted=adapts_head(found),
    )


def vera_plan(arch: Architecture, f: dict) -> MethodPlan:
    """VeRA: ``out + r`` per targeted linear (the vectors b and d). Autograd keeps each layer's
    ``B·(d ⊙ A·x)`` for b's gradient (out per token, as an IA³ output vector: ``scaled``) and
    ``A·x`` for d's (r per token: ``projected``) — not the input, A and B being frozen; the
    shared pair, ``r·max_in + max_out·r`` over the targets, is frozen weights memory."""
    r = int(f["r"])
    found = target_linears(arch, f["target_modules"])
    trainable = sum(o + r for _, o, _ in found.values())
    suffixes = block_suffixes(arch, found)
    max_in = max(i for i, _, _ in found.values())
    max_out = max(o for _, o, _ in found.values())
    return MethodPlan(
        "vera",
        trainable + trained_head_params(arch, f),
        {},
        scaled=dict.fromkeys(suffixes, "out"),
        projected=dict.fromkeys(suffixes, r),
        frozen_extra=r * (max_in + max_out),
        head_trainable=trains_head(arch, f),
        head_adapted=adapts_head(found),
    )


def qlora_plan(arch: Architecture, f: dict) -> MethodPlan:
    """LoRA's (or with ``use_dora`` DoRA's) closed form, with the targeted base weights stored
    in 4 bits and every other parameter upcast to float32 (as QLoRA's ``apply`` does)."""
    p = lowrank_plan("qlora", arch, f, dora=bool(f["use_dora"]))
    found = target_linears(arch, f["target_modules"], embeddings=not f["use_dora"])
    found.pop(INPUT_EMBEDDING[arch.family], None)  # an embedding target stays in float
    p.quantized = sum(i * o for i, o, _ in found.values())
    p.quant_bits = nf4_bits(int(f["blocksize"]), bool(f["double_quant"]))
    p.upcast_non_quantized = True
    p.checkpointing = bool(f["gradient_checkpointing"])
    return p


def adapter_plan(arch: Architecture, f: dict) -> MethodPlan:
    """Bottleneck adapters: ``d·m + m + m·d + d`` per adapted layer (``d`` its output width),
    after the layers the placement picks, or after ``target_modules``."""
    if f["target_modules"] is not None:
        sites = target_linears(arch, f["target_modules"])
    else:
        sites = adapter_sites(arch, f["placement"])
    sizes = AdapterConfig(bottleneck=f["bottleneck"], reduction_factor=f["reduction_factor"])
    n = 0
    for _, d, _ in sites.values():
        m = sizes.bottleneck_size(d)
        n += 2 * d * m + m + d
    return MethodPlan(
        "adapter",
        n + trained_head_params(arch, f),
        {},
        adapters=block_suffixes(arch, sites),
        bottleneck=sizes.bottleneck_size(arch.hidden),
        head_trainable=trains_head(arch, f),
        # Autograd keeps ReLU's and Tanh's output; GELU and SiLU keep their input as well.
        adapter_act_saves=2 if f["activation"] in ("gelu", "swish", "silu") else 1,
        inference_extra_params=n,
        head_adapted=adapts_head(sites),
    )


def prefix_plan(name: str, arch: Architecture, f: dict) -> MethodPlan:
    """Prefix-style methods: the table ``p·W`` with ``W = L·2·n_kv·d_head``, or with ``reparam``
    the embedding ``p·d`` and the MLP ``d·H + H + H·W + W``."""
    p_tok = int(f["num_virtual_tokens"])
    width = arch.layers * 2 * arch.kv_dim
    hid = int(f["reparam_hidden"]) if f["reparam"] else 0
    d = arch.hidden
    n = p_tok * d + d * hid + hid + hid * width + width if hid else p_tok * width
    return MethodPlan(
        name,
        n + trained_head_params(arch, f),
        {},
        kv_extra=p_tok,
        prefix_mlp_hidden=hid,
        head_trainable=trains_head(arch, f),
        inference_extra_params=p_tok * width,
    )


def prompt_plan(arch: Architecture, f: dict) -> MethodPlan:
    """Prompt tuning: the soft prompt ``p·d``; the sequence grows by ``p``."""
    p_tok = int(f["num_virtual_tokens"])
    return MethodPlan(
        "prompt",
        p_tok * arch.hidden + trained_head_params(arch, f),
        {},
        seq_extra=p_tok,
        head_trainable=trains_head(arch, f),
        inference_extra_params=p_tok * arch.hidden,
    )


def ia3_plan(arch: Architecture, f: dict) -> MethodPlan:
    """IA³: one vector per targeted linear, ``out`` wide (output scaled) or ``in`` wide (a
    feed-forward layer's input scaled); resolved as ``peftlab.apply`` resolves them."""
    config = IA3Config(
        target_modules=f["target_modules"], feedforward_modules=f["feedforward_modules"]
    )
    # A type outside IA³'s table is read from its blocks in apply: for this family's blocks
    # that reads the family's own defaults (k/v and the down projection).
    known = arch.model_type in IA3_DEFAULTS
    targets, feedforward = resolve_modules(config, arch.model_type if known else arch.family)
    found = target_linears(arch, targets)
    ff = feedforward_names(list(found), feedforward, f["feedforward_modules"] is not None)
    n = sum(i if name in ff else o for name, (i, o, _) in found.items())
    scaled = {
        s: "in" if name in ff else "out" for name in found for s in block_suffixes(arch, [name])
    }
    return MethodPlan(
        "ia3",
        n + trained_head_params(arch, f),
        {},
        scaled=scaled,
        head_trainable=trains_head(arch, f),
        head_adapted=adapts_head(found),
    )


def nf4_bits(blocksize: int = 64, double_quant: bool = True) -> float:
    """Bits per weight of bitsandbytes 4-bit storage: 4 + one absmax per block.

    Without double quantization the absmax is float32 (32/blocksize bits per weight); with it
    the absmax is uint8 plus one float32 scale per 256 absmax values (Dettmers et al. 2023,
    §"Double Quantization"): 4 + 8/64 + 32/(64·256) = 4.127 for blocksize 64.
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize
