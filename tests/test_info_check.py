"""Info file vs folders (issue #20): every disagreement is an error naming the entry and the fix,
in `persrep data check` and before a run; a missing category is an error only when the run needs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from persrep.cli import main
from persrep.config import load_settings
from persrep.data.check import check_dataset
from persrep.data.info_check import unsafe_entry
from persrep.pipeline.context import run_needs_categories
from persrep.data.layout import DatasetError

NAMES = ["mug_0", "mug_1", "can_0"]


def _dataset(root: Path, info: dict | None = "default") -> Path:
    for k, n in enumerate(NAMES):
        for split, count in (("train", 3), ("test", 1)):
            for i in range(count):
                p = root / split / n / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 24), (40 * k, 90, 30 * i)).save(p)
    if info == "default":
        info = {"classes": list(NAMES), "class_to_idx": {n: i for i, n in enumerate(NAMES)},
                "class_to_sc": {n: n.split("_")[0] for n in NAMES}}
    if info is not None:
        (root / "set_info.json").write_text(json.dumps(info))
    return root


def _info(root: Path) -> dict:
    return json.loads((root / "set_info.json").read_text())


def _edit(root: Path, fn) -> None:
    info = _info(root)
    fn(info)
    (root / "set_info.json").write_text(json.dumps(info))


def _errors(root: Path, **kw) -> list[str]:
    return [f.line() for f in check_dataset(str(root), **kw).of("error")]


def test_consistent_info_is_clean(tmp_path):
    rep = check_dataset(str(_dataset(tmp_path)), needs_categories=True)
    assert rep.exit_code == 0, rep.summary()


CASES = {  # id: (edit of the info file, needles of the error line)
    "entry_without_folder": (lambda i: i["classes"].append("ghost"),
                             ["classes names instance 'ghost'", "no train/ghost/", "remove 'ghost' from classes"]),
    "traversal_entry": (lambda i: i["class_to_sc"].update({"../../etc": "mug"}),
                        ["class_to_sc entry '../../etc'", "not safe as a folder name", "remove the entry"]),
    "absolute_entry": (lambda i: i["classes"].append("/etc"), ["classes entry '/etc' is an absolute path"]),
    "separator_entry": (lambda i: i["classes"].append("mug/0"), ["'mug/0' contains a path separator"]),
    "control_char_entry": (lambda i: i["classes"].append("mug\x07"), ["contains a control character"]),
    "duplicate_entry": (lambda i: i["classes"].append("mug_0"), ["classes lists 'mug_0' twice", "keep one entry"]),
    "case_only_difference": (lambda i: i["class_to_sc"].update({"MUG_0": "mug"}),
                             ["'MUG_0' differs only by case", "case-insensitive store"]),
    "duplicate_index": (lambda i: i["class_to_idx"].update({"can_0": 0}),
                        ["class_to_idx gives 'can_0' the index 0 of 'mug_0'", "its own index"]),
    "folder_without_entry": (lambda i: i["classes"].remove("can_0"),
                             ["instance 'can_0'", "folder not listed in 'classes'", "add 'can_0' to classes"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_info_disagreement_is_an_error_in_data_check(tmp_path, case, capsys):
    root = _dataset(tmp_path / "d")
    edit, needles = CASES[case]
    _edit(root, edit)
    errors = _errors(root)
    assert any(all(n in e for n in needles) for e in errors), errors
    assert main(["data", "check", str(root)]) == 2
    out = capsys.readouterr().out
    assert all(n in out for n in needles[:1]), out


def test_unsafe_entry_rules():
    assert unsafe_entry("mug_0") is None and unsafe_entry("café") is None
    for bad in ("", ".", "..", "a/b", "a\\b", "/abs", "C:x", "x..y", "tab\tname", 3):
        assert unsafe_entry(bad), bad


def test_missing_category_is_a_warning_naming_the_fallback_or_an_error_when_needed(tmp_path):
    root = _dataset(tmp_path / "d")
    _edit(root, lambda i: i["class_to_sc"].pop("can_0"))
    rep = check_dataset(str(root))
    warn = [f.line() for f in rep.of("warning")]
    assert rep.exit_code == 1 and any("'can_0'" in w and "fallback category 'object'" in w for w in warn), warn
    errs = _errors(root, needs_categories=True)
    assert any("'can_0'" in e and "needs categories" in e and "class_to_sc" in e for e in errs), errs


def test_no_info_file_all_uncategorised_warns_once(tmp_path):
    root = _dataset(tmp_path / "d", info=None)
    rep = check_dataset(str(root))
    assert rep.exit_code == 1
    assert len(rep.of("warning")) == 1 and "3 instance(s) have no category" in rep.of("warning")[0].line()


def test_which_runs_need_categories():
    base = ["personalization.negatives=external", "personalization.external_negatives=/x"]
    assert not run_needs_categories(load_settings("local", ["generator.types=[real_only]", *base]))
    assert not run_needs_categories(load_settings("local", ["generator.types=[real_only, cut_paste]", *base]))
    assert run_needs_categories(load_settings("local", ["generator.types=[real_only]", "personalization.negatives=generated"]))
    assert run_needs_categories(load_settings("local", ["generator.types=[dreambooth]", *base]))  # class prompts


def test_run_refuses_info_disagreement_before_compute(tmp_path):
    """Before a run: the same error, one line, from prepare_run (nothing trained)."""
    from persrep.pipeline.context import prepare_run

    root = _dataset(tmp_path / "d")
    _edit(root, lambda i: i["class_to_sc"].update({"../../etc": "mug"}))
    settings = load_settings("local", [f"data.path={root}", f"storage.root={tmp_path / 'runs'}",
                                       "generator.types=[real_only]", "personalization.negatives=in_pool",
                                       "tracking.enabled=false"])
    with pytest.raises(DatasetError, match=r"'\.\./\.\./etc'.*not safe as a folder name"):
        prepare_run(settings)
    # a missing category with generated negatives (they are drawn per category): refused too
    root2 = _dataset(tmp_path / "d2")
    _edit(root2, lambda i: i["class_to_sc"].pop("mug_1"))
    s2 = load_settings("local", [f"data.path={root2}", f"storage.root={tmp_path / 'runs2'}",
                                 "generator.types=[real_only]", "personalization.negatives=generated", "tracking.enabled=false"])
    with pytest.raises(DatasetError, match=r"'mug_1'.*needs categories"):
        prepare_run(s2)
    assert not (tmp_path / "runs2" / "adapters").exists()
