"""Hugging Face checkpoint conversion: declarative mapping tables, streaming import and export.

``rules.py`` (the table engine), ``transforms.py`` (named transforms), ``tables.py`` (one table per
family and the key layouts it accepts), ``hf_config.py`` (config.json <-> our config),
``hf_io.py`` (streaming safetensors), ``mcore.py`` (our checkpoints, tensor by tensor),
``importer.py`` / ``exporter.py`` / ``siglip.py`` (the conversions ``tools/convert_hf.py`` runs).
"""

from megatron_vlm.convert.exporter import ExportResult, export_hf
from megatron_vlm.convert.importer import ImportResult, import_hf
from megatron_vlm.convert.rules import ConversionError

__all__ = ["ConversionError", "ExportResult", "ImportResult", "export_hf", "import_hf"]
