"""Declarative name mapping between Hugging Face checkpoints and our megatron modules.

A family's mapping is a list of :class:`Rule` s, each relating one tensor of ours to one or more
HF tensors through a named :class:`Transform` (the identity for most). Names carry wildcards:
``{L}`` (a layer index) and ``{E}`` (an expert index) match digits, and the same value is used on
both sides. The same table serves import (HF -> ours), export (ours -> HF) and the Transformer
Engine spec names (``Rule.te``: TE fuses some norms into the following linear).

:class:`Alias` rules normalise the other key layouts transformers accepts (``save_pretrained``'s,
raw in-memory names, INT4-packed experts) onto the canonical release layout before the table is
applied; they are import-only.

Everything here works on names and tensors only: no files, no megatron.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

_WILDCARDS = {"L": r"\d+", "E": r"\d+", "p": r"weight|bias", "pre": r".+?", "rest": r".+"}
_FIELD = re.compile(r"\{(\w+)\}")


class ConversionError(ValueError):
    """A checkpoint cannot be converted: missing/unexpected keys, shape or dtype mismatch, an
    unsupported architecture or setting. The message names the tensor and file at fault."""


@dataclass(frozen=True)
class ConvertContext:
    """Model facts the transforms need (from the HF config / our config)."""

    num_heads: int = 0
    """LLM attention heads."""
    num_query_groups: int = 0
    """GQA LLMs: key/value heads (``model.llm.num_query_groups``); 0 for MLA."""
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    kv_lora_rank: int = 0
    vocab_size: int = 0
    """Real vocabulary size (HF rows); ours is padded to ``padded_vocab_size``."""
    padded_vocab_size: int = 0
    rope_interleave: bool = True
    """HF ``rope_interleave``: True = rope channels in interleaved pairs (megatron's layout)."""
    num_dense_layers: int = 0
    """Layers ``L < num_dense_layers`` are dense (``Rule.when``)."""
    vision_num_heads: int = 0
    vision_pos_emb_shape: tuple[int, ...] = ()
    """Our ``pos_embed.weight`` shape ``[H, W, D]`` (SigLIP stores it flat)."""

    def layer_kind(self, layer: int) -> str:
        return "dense" if layer < self.num_dense_layers else "moe"


@dataclass(frozen=True)
class Transform:
    """A named, invertible map between HF tensors (a list) and one tensor of ours."""

    name: str
    to_ours: Callable[[list[Tensor], ConvertContext], Tensor]
    to_hf: Callable[[Tensor, ConvertContext], list[Tensor]]
    blocks: Callable[[list[Tensor], ConvertContext], list[Tensor]] | None = None
    """Optional: ``to_ours`` as row blocks (dim 0) whose concatenation it is, and whose
    ``to_hf`` gives exactly those blocks back: import writes each block as it is and export
    reads them as the HF tensors, with no concatenated copy either way."""


IDENTITY = Transform("identity", lambda ts, ctx: ts[0], lambda t, ctx: [t])


def _compile(pattern: str) -> re.Pattern:
    out, pos = [], 0
    for m in _FIELD.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{_WILDCARDS[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(out) + "$")


def fill(pattern: str, binding: dict[str, str]) -> str:
    """``pattern`` with its wildcards replaced from ``binding``."""
    return _FIELD.sub(lambda m: binding[m.group(1)], pattern)


@dataclass(frozen=True)
class Rule:
    """One tensor of ours <-> HF tensor(s).

    Attributes:
        hf: HF names in the canonical (release) layout, in the order ``transform`` takes them.
        ours: our parameter name with megatron's local spec.
        te: the name with megatron's Transformer Engine spec, when it differs.
        transform: how the tensors relate.
        when: ``"dense"`` / ``"moe"``: the rule applies only to that kind of layer ``{L}``.
        keep_dtype: the HF file keeps this tensor's own dtype on export (``--dtype`` does not
            apply), e.g. fp32 ``e_score_correction_bias``.
        int4: the release ships these HF tensors as compressed-tensors INT4 (K2.5's routed
            experts); an INT4 export writes them so (``int4.py``).
    """

    hf: tuple[str, ...]
    ours: str
    te: str | None = None
    transform: Transform = IDENTITY
    when: str | None = None
    keep_dtype: bool = False
    int4: bool = False
    _ours_re: re.Pattern = field(init=False, repr=False, compare=False)
    _te_re: re.Pattern | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        object.__setattr__(self, "_ours_re", _compile(self.ours))
        object.__setattr__(self, "_te_re", _compile(self.te) if self.te else None)

    def match(self, name: str, ctx: ConvertContext, te: bool = False) -> dict[str, str] | None:
        regex = self._te_re if te and self._te_re is not None else self._ours_re
        m = regex.match(name)
        if m is None:
            return None
        binding = m.groupdict()
        if self.when is not None and ctx.layer_kind(int(binding["L"])) != self.when:
            return None
        return binding

    def hf_names(self, binding: dict[str, str]) -> list[str]:
        return [fill(p, binding) for p in self.hf]

    def ours_name(self, binding: dict[str, str], te: bool = False) -> str:
        return fill(self.te if te and self.te else self.ours, binding)


def prefixed(rules: Sequence[Rule], hf_prefix: str, ours_prefix: str) -> list[Rule]:
    """The same rules under a module prefix on each side (e.g. ``language_model.``)."""
    return [
        Rule(hf=tuple(hf_prefix + h for h in r.hf), ours=ours_prefix + r.ours,
             te=ours_prefix + r.te if r.te else None, transform=r.transform, when=r.when,
             keep_dtype=r.keep_dtype, int4=r.int4)
        for r in rules
    ]


class Table:
    """A family's rules, looked up by our (local or TE) parameter names."""

    def __init__(self, rules: Sequence[Rule], ctx: ConvertContext) -> None:
        self.rules = list(rules)
        self.ctx = ctx

    def lookup(self, name: str, te: bool = False) -> tuple[Rule, dict[str, str]]:
        """The one rule producing our tensor ``name``, with its wildcard binding."""
        found = [(r, b) for r in self.rules if (b := r.match(name, self.ctx, te)) is not None]
        if len(found) != 1:
            what = "no mapping rule" if not found else f"{len(found)} mapping rules"
            raise ConversionError(f"{what} for our tensor {name!r} (a bug in the family table)")
        return found[0]

    def from_hf_keys(self, keys: Sequence[str]) -> dict[str, tuple[Rule, list[str]]]:
        """Our names (local spec) and their HF sources for every rule whose first HF name
        matches one of ``keys`` (and whose other HF names are there too)."""
        present, out = set(keys), {}
        for rule in self.rules:
            regex = _compile(rule.hf[0])
            for key in keys:
                m = regex.match(key)
                if m is None:
                    continue
                binding = m.groupdict()
                if rule.when is not None and self.ctx.layer_kind(int(binding["L"])) != rule.when:
                    continue
                hf_names = rule.hf_names(binding)
                if all(k in present for k in hf_names):
                    out[rule.ours_name(binding)] = (rule, hf_names)
        return out

    def to_te_name(self, name: str) -> str:
        """Our local-spec name -> the Transformer Engine spec name (same tensor)."""
        rule, binding = self.lookup(name)
        return rule.ours_name(binding, te=True)

    def to_local_name(self, te_name: str) -> str:
        """A Transformer Engine spec name -> our local-spec name."""
        rule, binding = self.lookup(te_name, te=True)
        return rule.ours_name(binding)


# --- aliases: other HF key layouts -> the canonical one (import only) ---------------------------


@dataclass(frozen=True)
class Alias:
    """HF tensors named ``src`` (another layout) stand for canonical tensors ``dst``.

    ``fn`` maps the source tensors to the destination tensors (None: a rename, one to one). With
    ``expand`` set (a wildcard of ``dst`` absent from ``src``), the first source tensor's dim 0
    enumerates that wildcard and ``fn(tensors, ctx, index)`` returns that index's tensors (e.g.
    transformers' fused in-memory experts ``[E, 2I, H]`` -> per-expert ``gate/up_proj``).
    """

    src: tuple[str, ...]
    dst: tuple[str, ...]
    fn: Callable | None = None
    expand: str | None = None
    _src_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("src", "dst"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        object.__setattr__(self, "_src_re", _compile(self.src[0]))

    def match(self, key: str) -> dict[str, str] | None:
        m = self._src_re.match(key)
        return None if m is None else m.groupdict()


def meta_like(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A data-less tensor for shape/dtype inference through a transform."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")
