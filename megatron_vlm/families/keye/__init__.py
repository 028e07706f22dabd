"""Keye-VL 1.5: SigLIP NaViT tower with 2D RoPE, 2x2 merger, Qwen3 LLM, M-RoPE positions."""
