"""Refuse, before compute, settings whose paths overlap the run's own output (issue #20).

After :mod:`persrep.pipeline.paths` made every path absolute on the driver:
* an **input** path (``data.path``, ``personalization.external_negatives``,
  ``generator.cut_paste.backgrounds``, ``synthesis.captions_file``, ``generator.base_model``, a
  backbone's ``weights``) inside the storage root is refused, except under ``<root>/datasets/``
  (where the job itself writes the toy world and converted PODS sets): everything else there is the
  run's output (units, runs, Tune state), which a run would then read as input and rewrite;
* a storage root inside the data set (or equal to it) is refused: the run's outputs would land
  among the instance folders and be read as data by the next run.
Local paths are compared resolved (symlinks followed); ``s3://`` URIs by bucket and key prefix;
a local path and a URI never overlap. Keywords (``toy``, ``offline``...), ``@data/...`` and hub
model ids are not paths and are not checked.
"""

from __future__ import annotations

from pathlib import Path

from persrep.config import ConfigError, Settings
from persrep.pipeline.paths import DATA_PREFIX, KEYWORDS, PATH_SETTINGS

OWN_INPUTS = "datasets"  # the only part of a storage root a run may read as input


def _norm(value: str) -> str | None:
    """A comparable form (``s3://b/k/`` or ``/abs/path/``), or None for what is not a path."""
    if not value or value in KEYWORDS or value.startswith(DATA_PREFIX):
        return None
    if value.startswith("s3://"):
        return value.rstrip("/") + "/"
    if "://" in value:
        return None
    p = Path(value).expanduser()
    if not p.is_absolute():
        return None  # a hub model id (resolve_settings_paths made every local path absolute)
    return str(p.resolve()).rstrip("/") + "/"


def _inside(child: str, parent: str) -> bool:
    return child.startswith(parent)


def _inputs(settings: Settings) -> list[tuple[str, str]]:
    out = []
    for dotted, _ in PATH_SETTINGS:
        if dotted == "storage.root":
            continue
        node = settings
        for part in dotted.split("."):
            node = getattr(node, part)
        if isinstance(node, str):
            out.append((dotted, node))
    out += [(f"personalization.backbones[{i}].weights", b.weights)
            for i, b in enumerate(settings.personalization.backbones) if isinstance(b.weights, str)]
    return out


def check_path_overlaps(settings: Settings) -> None:
    """Raise :class:`ConfigError` (one line) when a path overlaps the run's own output."""
    root_raw = settings.storage.root
    root = _norm(root_raw)
    if root is None:
        return
    own = root + OWN_INPUTS + "/"
    data = _norm(settings.data.path)
    if data is not None and _inside(root, data):
        raise ConfigError(f"storage.root={root_raw} is inside the data set data.path={settings.data.path}: "
                          "the run's outputs would be read as instance folders by the next run; "
                          "put the storage root outside the data set")
    for name, raw in _inputs(settings):
        value = _norm(raw)
        if value is None:
            continue
        if _inside(value, root) and not _inside(value, own):
            raise ConfigError(f"{name}={raw} points into the run's own output (storage.root={root_raw}, "
                              "where units and runs are written): move it outside the storage root "
                              f"(or, for a data set, under {root_raw.rstrip('/')}/{OWN_INPUTS}/), or use "
                              "another storage.root")
