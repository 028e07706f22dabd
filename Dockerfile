# megatron_vlm GPU image, first version.
# Base: NVIDIA's PyTorch container, which ships CUDA torch, Transformer Engine, Apex and
# flash-attn. We never reinstall torch over it (the torch==2.13.0 pin lives only in
# constraints-cpu.txt for the CPU path) and never install the unrelated PyPI package "apex".
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/megatron_vlm
COPY pyproject.toml setup.py README.md ./
COPY megatron_vlm ./megatron_vlm
COPY tools ./tools
COPY examples ./examples

# Keep the container's torch: constrain it to the installed version while installing our deps.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/container-torch.txt \
 && pip install --no-cache-dir -c /tmp/container-torch.txt -e ".[hf]" \
 && python -c "import torch, megatron.core, transformer_engine; print(torch.__version__, megatron.core.__version__)"

CMD ["python", "-m", "megatron_vlm.train", "--help"]
