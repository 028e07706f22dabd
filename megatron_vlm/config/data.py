"""Data configuration: corpus, tokenizer and the packed micro-batch (SPEC §11)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_vlm.config.data_mm import MultimodalDataConfig


@dataclass(kw_only=True)
class DataConfig:
    """Where data comes from and how it is packed into micro-batches."""

    corpus_dir: str | None = None
    """Directory of the text corpus (train.txt / valid.txt); None = the bundled corpus."""
    tokenizer: str | None = None
    """Tokenizer path: the tokenizer directory shipped beside an HF checkpoint (Kimi:
    ``tiktoken.model`` + ``tokenizer_config.json``; Qwen / GLM / InternVL: ``tokenizer.json``),
    a SentencePiece ``.model`` or a tiktoken BPE file. Media, chat and document token ids come
    from it. None = train a SentencePiece model of ``tokenizer_vocab_size`` pieces on the text
    corpus into the run directory (the tiny recipes; real-size recipes refuse None)."""
    tokenizer_type: Literal["auto", "tiktoken", "hf", "sentencepiece"] = "auto"
    """Reader of ``tokenizer``: ``auto`` decides from the files (``tiktoken.model`` -> Kimi's
    tiktoken, ``tokenizer.json``/``tokenizer_config.json`` -> transformers, a protobuf
    ``.model`` -> SentencePiece)."""
    tokenizer_model: str | None = None
    """Legacy name of ``tokenizer`` (older job.yaml files); folded into it."""
    tokenizer_vocab_size: int = 1024
    """Vocab size when a SentencePiece model is trained here (``tokenizer`` None)."""
    require_inputs: bool = False
    """Refuse to start unless ``tokenizer`` and a data root are set (``data.multimodal.root``
    or every mixed dataset in ``data.multimodal.datasets``; ``data.corpus_dir`` for text-only).
    Real-size recipes set it: they must never train a tokenizer on the bundled toy corpus."""
    seq_length: int = 256
    """LLM tokens per packed micro-batch (S)."""
    micro_batch_size: int = 1
    """Packed sequences per micro-batch (the packed contract uses 1)."""
    global_batch_size: int = 4
    """Packed sequences per optimizer step over all DP ranks and accumulation steps."""
    seed: int = 1234
    """Shuffling seed."""
    pad_to_multiple: int = 1
    """Each document is padded to a multiple of this (2*cp*tp under CP/SP; SPEC §11)."""
    multimodal: MultimodalDataConfig | None = None
    """Multimodal shards (images, video, interleaved, text) on energon; None = text corpus."""
    prepacked: str | None = None
    """A file of packed micro-batches saved once from the real loader (``data/prepacked.py``;
    written by ``python -m benchmarks.gpu_smoke --prepare``), replayed as a deterministic cycle
    instead of reading ``multimodal`` or ``corpus_dir``: for machines without energon or the
    video decoders (the lent GPU machine, SPEC §12). Its sequence length must equal
    ``seq_length``; set ``tokenizer`` to the tokenizer written beside it. None = the loaders."""

    def __post_init__(self) -> None:
        if self.tokenizer_model is not None:
            if self.tokenizer is not None and self.tokenizer != self.tokenizer_model:
                raise ValueError(
                    f"data.tokenizer_model={self.tokenizer_model!r} is the legacy name of "
                    f"data.tokenizer={self.tokenizer!r}; set only data.tokenizer")
            self.tokenizer, self.tokenizer_model = self.tokenizer_model, None
        if self.seq_length < 8:
            raise ValueError(f"data.seq_length={self.seq_length} is too small; use >= 8")
        if self.micro_batch_size != 1:
            raise ValueError(
                "data.micro_batch_size must be 1: a micro-batch is one packed sequence "
                "(raise data.seq_length or data.global_batch_size instead)"
            )
        if self.global_batch_size < 1:
            raise ValueError("data.global_batch_size must be >= 1")

    def missing_inputs(self) -> list[str]:
        """Config keys a ``require_inputs`` run still needs (empty when it can start)."""
        if not self.require_inputs:
            return []
        missing = [] if self.tokenizer else ["data.tokenizer"]
        mm = self.multimodal
        if self.prepacked:  # the batches are in the file: no data root is read
            return missing
        if mm is None:
            if not self.corpus_dir:
                missing.append("data.corpus_dir")
        elif not mm.root:
            unplaced = sorted(n for n, w in mm.mix.weights.items()
                              if w > 0 and not str(mm.datasets.get(n, "")).startswith("/"))
            if unplaced:
                missing.append(f"data.multimodal.root (or absolute data.multimodal.datasets."
                               f"<name> for {unplaced})")
        return missing
