"""InternVL3.5 (Shanghai AI Lab): InternViT-300M / 6B, pixel shuffle 0.5 and the ``mlp1``
projector, Qwen3 / Qwen3-MoE / GPT-OSS LLMs with plain 1D RoPE, dynamic 448-px tiling
(``../shared/FAMILIES.md`` §3). Parts are added module by module; the family is declared in
``family.py``."""
