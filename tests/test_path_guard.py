"""Paths that overlap the run's own output are refused before compute (issue #20): an input inside
the storage root (except its datasets/ area), a storage root inside the data set or equal to it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from persrep.config import ConfigError, load_settings
from persrep.pipeline.path_guard import check_path_overlaps
from persrep.pipeline.paths import resolve_settings_paths

sys.path.insert(0, str(Path(__file__).parent))
from helpers import error_lines, run_all_main  # noqa: E402


def _check(tmp_path, *overrides):
    s = resolve_settings_paths(load_settings("local", list(overrides)), cwd=tmp_path)
    check_path_overlaps(s)


REFUSED = {  # id: (overrides relative to tmp_path, needles)
    "negatives_in_output": (["storage.root=out", "personalization.negatives=external",
                             "personalization.external_negatives=out/synthesis/abc"],
                            ["personalization.external_negatives=", "points into the run's own output"]),
    "backgrounds_in_runs": (["storage.root=out", "generator.cut_paste.backgrounds=out/runs/r1"],
                            ["generator.cut_paste.backgrounds=", "storage.root="]),
    "data_is_the_root": (["storage.root=out", "data.path=out"], ["storage.root=", "inside the data set"]),
    "data_in_adapters": (["storage.root=out", "data.path=out/adapters"], ["data.path="]),
    "captions_in_output": (["storage.root=out", "synthesis.captions_file=out/evaluations/c.json"],
                           ["synthesis.captions_file="]),
    "weights_in_output": (["storage.root=out",
                           "personalization.backbones=[{name: vit_tiny_patch16_224, weights: ./out/w.safetensors}]"],
                          ["personalization.backbones[0].weights="]),
    "root_inside_data": (["storage.root=mydata/runs", "data.path=mydata"],
                         ["storage.root=", "inside the data set data.path="]),
    "root_is_data": (["storage.root=mydata", "data.path=./mydata/"], ["inside the data set"]),
    "s3_root_inside_s3_data": (["storage.root=s3://bkt/pods/out", "data.path=s3://bkt/pods"],
                               ["storage.root=s3://bkt/pods/out", "inside the data set"]),
    "s3_input_in_s3_output": (["storage.root=s3://bkt/runs", "data.path=s3://bkt/runs/synthesis"],
                              ["data.path=s3://bkt/runs/synthesis", "own output"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_overlapping_paths_are_refused_with_one_line(tmp_path, case):
    overrides, needles = REFUSED[case]
    with pytest.raises(ConfigError) as exc:
        _check(tmp_path, *overrides)
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_symlinked_data_set_into_the_output_is_refused(tmp_path):
    (tmp_path / "out" / "synthesis").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "out" / "synthesis")
    with pytest.raises(ConfigError, match="data.path=.*own output"):
        _check(tmp_path, "storage.root=out", "data.path=link")


@pytest.mark.parametrize("overrides", [
    ["storage.root=out", "data.path=toy"],                                 # the default
    ["storage.root=out", "data.path=out/datasets/toy-abc"],               # the job's own data area
    ["storage.root=out", "data.path=data", "personalization.external_negatives=@data/negatives"],
    ["storage.root=out-2", "data.path=out"],                              # a sibling, not a parent
    ["storage.root=s3://bkt/runs", "data.path=s3://bkt/runs-data"],
    ["storage.root=s3://bkt/runs", "data.path=/local/runs"],
    ["storage.root=data/../out", "data.path=data"],                       # normalised: a sibling
])
def test_separate_paths_pass(tmp_path, overrides):
    _check(tmp_path, *overrides)


def test_run_all_refuses_a_storage_root_inside_the_data_set_before_writing(tmp_path, capsys, monkeypatch):
    data = tmp_path / "mydata"
    (data / "train" / "mug_0").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    rc = run_all_main(["--no-ray", "--data", "mydata", "--storage", "mydata/out", "tracking.enabled=false"])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err[-2000:]
    assert "inside the data set" in lines[0] and "Traceback" not in err
    assert not (data / "out").exists()  # refused before the storage root was even probed
