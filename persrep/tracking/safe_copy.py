"""Artifacts staged for MLflow with secrets redacted (text) or withheld (binary)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from persrep.redaction import redact_obj, redact_text

TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".csv", ".tsv", ".html", ".htm",
                 ".log", ".py", ".cfg", ".ini", ".toml", ".svg"}


def _stage_safe_copy(src: Path, dest: Path, env_values: list[str]) -> bool:
    """Copy src -> dest, redacting text; False (nothing written) for a binary holding a secret."""
    data = src.read_bytes()
    is_text = src.suffix.lower() in TEXT_SUFFIXES
    if not is_text:
        try:
            data.decode("utf-8")
            is_text = b"\x00" not in data[:4096] and len(data) < 50_000_000
        except UnicodeDecodeError:
            is_text = False
    if is_text:
        text = data.decode("utf-8", errors="replace")
        dest.write_text(_redact_document(text, src.suffix.lower(), env_values))
        return True
    if any(v.encode() in data for v in env_values):
        return False
    shutil.copyfile(src, dest)
    return True


def _redact_document(text: str, suffix: str, env_values: list[str]) -> str:
    """Structured redaction for JSON/YAML (stays parseable), regex redaction otherwise."""
    try:
        if suffix == ".json":
            return json.dumps(redact_obj(json.loads(text), env_values), indent=1, default=str)
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_dump(redact_obj(yaml.safe_load(text), env_values), sort_keys=False)
    except Exception:  # noqa: BLE001 - fall back to text redaction
        pass
    return redact_text(text, env_values)

