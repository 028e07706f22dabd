# megatron_vlm GPU image on NVIDIA's PyTorch container (NGC), pinned to one release.
#
# The container already ships the CUDA build of torch, Triton, Transformer Engine, flash-attn and
# NVIDIA's fused-kernel library (Apex): we install megatron_vlm and its pure-Python dependencies
# around them and change none of them. pip gets the container's own versions of that GPU stack as
# constraints (generated inside the image, so they always match it), and the build fails if any
# of them changed. The torch==2.13.0 pin of the CPU path lives only in constraints-cpu.txt
# (tools/setup_cpu.sh); it is never used here.
#
#   docker build -t megatron_vlm:25.10 .
#   enroot import -o megatron_vlm.sqsh dockerd://megatron_vlm:25.10   # for pyxis (tools/launch.py)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/megatron_vlm

# The container's GPU stack, exactly as installed: torch (+ vision/audio), Triton, Transformer
# Engine, flash-attn and the CUDA libraries' wheels.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|transformer[-_]engine[-_a-z0-9]*|flash[-_]attn|nvidia[-_][-_a-z0-9]*)==' \
      > /opt/container-gpu-stack.txt \
 && grep -qi '^torch==' /opt/container-gpu-stack.txt \
 && cat /opt/container-gpu-stack.txt

COPY pyproject.toml setup.py README.md ./
COPY megatron_vlm ./megatron_vlm
COPY tools ./tools

# Install under those constraints, then prove nothing of the GPU stack moved (same names, same
# versions) and that the extras are still importable as modules.
RUN pip install --no-cache-dir -c /opt/container-gpu-stack.txt -e ".[hf]" \
 && pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|transformer[-_]engine[-_a-z0-9]*|flash[-_]attn|nvidia[-_][-_a-z0-9]*)==' \
      | cmp - /opt/container-gpu-stack.txt \
 && python -c "import importlib.util as u, sys; \
missing = [m for m in ('transformer_engine', 'flash_attn') if u.find_spec(m) is None]; \
sys.exit(f'GPU extras missing from the image: {missing}' if missing else 0)" \
 && python -c "import megatron_vlm.config, megatron_vlm.cluster; print('megatron_vlm installed')"

CMD ["python", "-m", "megatron_vlm.train", "--help"]
