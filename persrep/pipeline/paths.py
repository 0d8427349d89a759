"""Every path in the settings, resolved once on the driver against the directory the command runs in.

Workers do not share the driver's working directory (Ray Tune runs each trial in its own trial
directory; a worker on another node has another filesystem root), so a relative path that the
driver's pre-flight accepted would fail on every worker. :func:`resolve_settings_paths` turns every
local relative path into an absolute one before the settings are shipped; URIs (``s3://``),
``@data/...`` (relative to the data set root, itself resolved here) and keywords (``toy``,
``generated``, ``tiny``, ``offline``, ``none``) are left as they are.
"""

from __future__ import annotations

from pathlib import Path

from persrep.config import Settings
from persrep.data.layout import DATA_PREFIX
KEYWORDS = {"toy", "generated", "tiny", "offline", "none"}
# (dotted setting, resolve only when it names an existing path: model ids look like 'org/name')
PATH_SETTINGS: tuple[tuple[str, bool], ...] = (
    ("data.path", False),
    ("personalization.external_negatives", False),
    ("generator.cut_paste.backgrounds", False),
    ("synthesis.captions_file", False),
    ("storage.root", False),
    ("generator.base_model", True),
)


def resolve_path(value: str | None, cwd: Path, only_if_exists: bool = False) -> str | None:
    """``value`` made absolute against ``cwd`` when it is a local relative path; else unchanged."""
    if value is None or not value.strip() or value in KEYWORDS or "://" in value or value.startswith(DATA_PREFIX):
        return value
    expanded = Path(value).expanduser()
    explicit = value.startswith(("/", "./", "../", "~"))
    path = expanded if expanded.is_absolute() else cwd / expanded
    if only_if_exists and not explicit and not path.exists():
        return value  # a hub model id such as runwayml/stable-diffusion-v1-5
    return str(path.resolve()) if path.exists() else str(path.absolute())


def _get(settings: Settings, dotted: str):
    node = settings
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = getattr(node, part)
    return node, parts[-1]


def resolve_settings_paths(settings: Settings, cwd: str | Path | None = None) -> Settings:
    """A copy of ``settings`` whose local paths are absolute (against ``cwd``, default the process's)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    out = settings.model_copy(deep=True)
    for dotted, only_if_exists in PATH_SETTINGS:
        node, field = _get(out, dotted)
        value = getattr(node, field)
        new = resolve_path(value, base, only_if_exists)
        if new != value:
            setattr(node, field, new)
    for bs in out.personalization.backbones:  # local weight files/directories (not hub ids)
        new = resolve_path(bs.weights, base, only_if_exists=True)
        if new != bs.weights:
            bs.weights = new
    return out
