"""GLM-4.5V / GLM-4.1V (Zhipu): the Glm4v vision tower, GLM-4.5-Air MoE or GLM-4 dense LLM with
half-dimension M-RoPE (``../shared/FAMILIES.md`` §2). Parts are added module by module; the
family is declared in ``family.py``."""
