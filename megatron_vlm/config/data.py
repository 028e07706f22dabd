"""Data configuration: corpus, tokenizer and the packed micro-batch (SPEC §11)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_vlm.config.data_mm import MultimodalDataConfig


@dataclass(kw_only=True)
class DataConfig:
    """Where data comes from and how it is packed into micro-batches."""

    corpus_dir: str | None = None
    """Directory of the text corpus (train.txt / valid.txt); None = the bundled corpus."""
    tokenizer_model: str | None = None
    """SentencePiece model path; None = train one on the corpus into the run directory."""
    tokenizer_vocab_size: int = 1024
    """Vocab size when a SentencePiece model is trained here."""
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

    def __post_init__(self) -> None:
        if self.seq_length < 8:
            raise ValueError(f"data.seq_length={self.seq_length} is too small; use >= 8")
        if self.micro_batch_size != 1:
            raise ValueError(
                "data.micro_batch_size must be 1: a micro-batch is one packed sequence "
                "(raise data.seq_length or data.global_batch_size instead)"
            )
        if self.global_batch_size < 1:
            raise ValueError("data.global_batch_size must be >= 1")
