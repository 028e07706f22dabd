"""Hugging Face checkpoint conversion: declarative mapping tables, streaming import and export.

``rules.py`` (the table engine), ``transforms.py`` (named transforms), ``tables.py`` (one table per
family and the key layouts it accepts), ``hf_config.py`` (config.json <-> our config),
``hf_io.py`` (streaming safetensors), ``mcore.py`` (our checkpoints, tensor by tensor),
``importer.py`` / ``exporter.py`` / ``siglip.py`` (the conversions ``tools/convert_hf.py`` runs),
``int4.py`` (K2.5's INT4 routed experts, through compressed-tensors), ``tokenizer_export.py``
(the run's tokenizer and special-token ids beside an export) and ``hf_assets.py`` (processor and
generation configs, file modes).

INT4 export (``convert_hf.py export CKPT OUT --int4-experts``, needs ``megatron_vlm[int4]``)
writes a trained model in the K2.5 release's format, so it serves like the release
(vLLM/SGLang/transformers read the same ``quantization_config``) at about a third of the bf16
size (3.45x smaller for K2.5's LLM: 2.05 TB -> 0.59 TB): the routed experts' ``gate/up/down_proj``
become compressed-tensors ``pack-quantized`` INT4 (``weight_packed``/``weight_scale``/
``weight_shape``; symmetric, group 32, min-max scales computed by the library from the bf16
weight), everything else stays bf16 (fp32 router bias), and ``quantization_config`` is the
release's (in ``text_config`` for K2.5). Quantisation costs up to 0.53 of a step per weight (see
``int4.py``); importing the result gives the exact dequantised weights. Re-exporting an imported
INT4 checkpoint re-derives the scales, so it is not bit-identical to the checkpoint it came from.
"""

from megatron_vlm.convert.exporter import ExportResult, export_hf
from megatron_vlm.convert.importer import ImportResult, import_hf
from megatron_vlm.convert.rules import ConversionError

__all__ = ["ConversionError", "ExportResult", "ImportResult", "export_hf", "import_hf"]
