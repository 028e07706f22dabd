"""Vision towers on megatron-core blocks: MoonViT / MoonViT-3D (Kimi-VL, Kimi K2.5)."""
