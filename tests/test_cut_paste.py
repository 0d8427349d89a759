"""Cut-and-paste and real-only generators: exact masks, determinism, geometry, backgrounds, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from persrep.config import Settings
from persrep.generation.base import IDENTIFIER, InstanceData, SampleRow, get_generator
from persrep.generation.cut_paste import (BACKGROUND_PROMPTS, BaseModelBackgrounds, FolderBackgrounds,
                                          draw_placement, resolve_data_path)

SIZE = 64
RED, YELLOW, MAGENTA = (255, 0, 0), (255, 255, 0), (255, 0, 255)


def object_photo(seed: int) -> tuple[Image.Image, Image.Image]:
    """A 48x40 photo: a rectangle, left half red and right half yellow (so a flip shows), on a
    magenta surround that must never be pasted; and its mask."""
    rng = np.random.default_rng(seed)
    photo = np.zeros((48, 40, 3), np.uint8)
    photo[:] = MAGENTA
    top, left = int(rng.integers(4, 10)), int(rng.integers(3, 8))
    photo[top:top + 30, left:left + 12] = RED
    photo[top:top + 30, left + 12:left + 24] = YELLOW
    mask = np.zeros((48, 40), np.uint8)
    mask[top:top + 30, left:left + 24] = 255
    return Image.fromarray(photo), Image.fromarray(mask)


def make_instance(with_masks: bool = True) -> InstanceData:
    pairs = [object_photo(i) for i in range(3)]
    return InstanceData("mug_1", "mug", [p for p, _ in pairs], [m for _, m in pairs] if with_masks else None)


@pytest.fixture
def background_dir(tmp_path):
    """Blue-ish noisy backgrounds (red channel <= 60, so pasted red/yellow pixels stand out)."""
    folder = tmp_path / "data" / "backgrounds"
    folder.mkdir(parents=True)
    for i in range(3):
        rng = np.random.default_rng(100 + i)
        pixels = np.stack([rng.integers(0, 61, (80, 100)), rng.integers(0, 256, (80, 100)),
                           rng.integers(150, 256, (80, 100))], axis=-1).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"bg_{i}.png")
    return folder


def make_settings(backgrounds: str, **cut_paste) -> Settings:
    settings = Settings()
    settings.synthesis.resolution = SIZE
    settings.generator.cut_paste.backgrounds = backgrounds
    for key, value in cut_paste.items():
        setattr(settings.generator.cut_paste, key, value)
    return settings


def rows_for(n: int, generator: str = "cut_paste", role: str = "positive") -> list[SampleRow]:
    return [SampleRow("mug_1", role, generator, "", 0.0, seed=1000 + 7 * i, index=i) for i in range(n)]


def loaded(type_name: str, settings: Settings, instance: InstanceData, tmp_path, **attrs):
    generator = get_generator(type_name, settings)
    for key, value in attrs.items():
        setattr(generator, key, value)
    generator.load(generator.prepare(instance, tmp_path / "scratch"))
    return generator


def arrays(sample) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(sample.image).astype(int), np.asarray(sample.mask) > 0


# ---------------------------------------------------------------------------------------------
# cut-and-paste
@pytest.mark.parametrize("edge_blur", [0.0, 1.5])
def test_mask_matches_the_pasted_pixels_exactly(background_dir, tmp_path, edge_blur):
    settings = make_settings(str(background_dir), edge_blur=edge_blur)
    generator = loaded("cut_paste", settings, make_instance(), tmp_path)
    folder = FolderBackgrounds(str(background_dir))
    for sample in generator.sample(rows_for(12)):
        image, mask = arrays(sample)
        placement = draw_placement(sample.row.seed, settings.generator.cut_paste)
        background = np.asarray(folder(placement.background_seed, SIZE)).astype(int)
        assert sample.image.size == sample.mask.size == (SIZE, SIZE)
        assert 0 < mask.sum() < SIZE * SIZE
        # outside the mask: the background, byte for byte
        assert np.array_equal(image[~mask], background[~mask])
        inside = image[mask]
        # inside: foreground pixels (red/yellow, never the magenta surround), every one changed
        assert np.all(np.abs(inside - background[mask]).max(axis=1) > 0)
        if edge_blur == 0:
            assert np.all(inside[:, 0] == 255) and np.all(inside[:, 2] == 0)
        else:  # foreground weight >= 0.5 on the rim: red high, blue at most half the background's
            assert np.all(inside[:, 0] >= 127) and np.all(inside[:, 2] <= 128)


def test_deterministic_and_a_row_regenerates_alone(background_dir, tmp_path):
    settings = make_settings(str(background_dir))
    rows = rows_for(8)
    first = loaded("cut_paste", settings, make_instance(), tmp_path).sample(rows)
    second = loaded("cut_paste", settings, make_instance(), tmp_path).sample(rows)
    alone = loaded("cut_paste", settings, make_instance(), tmp_path).sample([rows[5]])[0]
    for a, b in zip(first, second):
        assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert alone.image.tobytes() == first[5].image.tobytes()
    assert alone.mask.tobytes() == first[5].mask.tobytes()
    assert len({s.image.tobytes() for s in first}) == len(first)  # different seeds, different images


def test_scale_sets_the_objects_size(background_dir, tmp_path):
    areas = {}
    for scale in (0.3, 0.6):
        settings = make_settings(str(background_dir), scale_range=(scale, scale), rotation_degrees=0.0)
        samples = loaded("cut_paste", settings, make_instance(), tmp_path).sample(rows_for(6))
        areas[scale] = np.array([arrays(s)[1].sum() for s in samples])
        for s in samples:  # the longer side (30 px photo height) covers `scale` of the canvas
            mask = arrays(s)[1]
            height = np.ptp(np.flatnonzero(mask.any(axis=1))) + 1
            assert abs(height - scale * SIZE) <= 1.5
    ratio = areas[0.6] / areas[0.3]  # area grows with the square of the scale
    assert np.all((ratio > 3.2) & (ratio < 4.8))


def test_object_stays_inside_and_large_scales_fill_the_canvas(background_dir, tmp_path):
    settings = make_settings(str(background_dir), scale_range=(0.7, 0.7), rotation_degrees=15.0)
    for sample in loaded("cut_paste", settings, make_instance(), tmp_path).sample(rows_for(10)):
        mask = arrays(sample)[1]  # whole object inside: a full rectangle's area, none cropped off
        assert mask.sum() > 0.9 * (0.7 * SIZE) * (0.7 * SIZE * 24 / 30)
    settings = make_settings(str(background_dir), scale_range=(1.2, 1.2), rotation_degrees=0.0)
    for sample in loaded("cut_paste", settings, make_instance(), tmp_path).sample(rows_for(4)):
        mask = arrays(sample)[1]  # taller than the canvas: covers every row, cropped, still pasted
        assert mask.any(axis=1).all() and not mask.all()


def test_rotation_and_flip_take_effect(background_dir, tmp_path):
    def samples(**cut_paste):
        settings = make_settings(str(background_dir), scale_range=(0.5, 0.5), **cut_paste)
        return loaded("cut_paste", settings, make_instance(), tmp_path).sample(rows_for(12))

    def box_fill(mask):  # mask area / its bounding box area: 1 for an upright rectangle
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        return mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))

    upright = [box_fill(arrays(s)[1]) for s in samples(rotation_degrees=0.0, flip=False)]
    tilted = [box_fill(arrays(s)[1]) for s in samples(rotation_degrees=45.0, flip=False)]
    assert min(upright) > 0.97
    assert sum(f < 0.9 for f in tilted) >= 6  # |angle| > ~10 deg for most of 12 seeds

    def yellow_on_left(sample):  # the object's leftmost column: red unless flipped
        image, mask = arrays(sample)
        col = np.flatnonzero(mask.any(axis=0))[0] + 1
        return image[mask[:, col], col, 1].mean() > 128

    assert not any(yellow_on_left(s) for s in samples(rotation_degrees=0.0, flip=False))
    flipped = [yellow_on_left(s) for s in samples(rotation_degrees=0.0, flip=True)]
    assert 0 < sum(flipped) < len(flipped)


def test_missing_masks_is_a_clear_error(tmp_path):
    generator = get_generator("cut_paste", make_settings("generated"))
    with pytest.raises(ValueError, match="no train masks") as info:
        generator.prepare(make_instance(with_masks=False), tmp_path)
    assert "train_masks/" in str(info.value) and "real_only" in str(info.value)
    # one empty mask: that photo is left out, the others serve (issue #26); all empty: refused
    one_empty = make_instance()
    one_empty.train_masks[1] = Image.new("L", one_empty.train_images[1].size, 0)
    generator.prepare(one_empty, tmp_path)
    all_empty = make_instance()
    all_empty.train_masks = [Image.new("L", im.size, 0) for im in all_empty.train_images]
    with pytest.raises(ValueError, match="every train mask is empty"):
        generator.prepare(all_empty, tmp_path)


def test_data_prefix_resolves_against_the_data_root(background_dir, tmp_path):
    assert resolve_data_path("@data/backgrounds", "/d/set/") == "/d/set/backgrounds"
    assert resolve_data_path("@data/bg", "s3://bucket/pods") == "s3://bucket/pods/bg"
    assert resolve_data_path("/abs/folder", None) == "/abs/folder"
    with pytest.raises(ValueError, match="no data root"):
        resolve_data_path("@data/backgrounds", None)

    settings = make_settings("@data/backgrounds")
    relative = loaded("cut_paste", settings, make_instance(), tmp_path, data_root=str(background_dir.parent))
    direct = loaded("cut_paste", make_settings(str(background_dir)), make_instance(), tmp_path)
    assert relative.backgrounds_setting() == f"{background_dir.parent}/backgrounds"
    assert [s.image.tobytes() for s in relative.sample(rows_for(3))] == \
        [s.image.tobytes() for s in direct.sample(rows_for(3))]
    with pytest.raises(ValueError, match="data_root"):
        loaded("cut_paste", settings, make_instance(), tmp_path).sample(rows_for(1))


def test_empty_backgrounds_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    generator = loaded("cut_paste", make_settings(str(tmp_path / "empty")), make_instance(), tmp_path)
    with pytest.raises(ValueError, match="missing or has no images"):
        generator.sample(rows_for(1))


@pytest.mark.realdata
def test_real_backgrounds_folder(shared_data, tmp_path):
    folder = shared_data / "backgrounds"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    settings = make_settings(str(folder))
    samples = loaded("cut_paste", settings, make_instance(), tmp_path).sample(rows_for(6))
    source = FolderBackgrounds(str(folder))
    assert len({s.image.tobytes() for s in samples}) == 6
    for sample in samples:
        image, mask = arrays(sample)
        placement = draw_placement(sample.row.seed, settings.generator.cut_paste)
        background = np.asarray(source(placement.background_seed, SIZE)).astype(int)
        assert sample.image.mode == "RGB" and sample.image.size == (SIZE, SIZE)
        assert np.array_equal(image[~mask], background[~mask])


def test_generated_backgrounds_need_an_injected_source(tmp_path):
    def solid(seed: int, size: int) -> Image.Image:
        return Image.new("RGB", (size * 2, size), (0, seed % 256, 200))  # wrong size: gets fitted

    generator = loaded("cut_paste", make_settings("generated"), make_instance(), tmp_path)
    with pytest.raises(ValueError, match="no background source"):
        generator.sample(rows_for(1))
    generator.background_source = solid
    sample = generator.sample(rows_for(1))[0]
    image, mask = arrays(sample)
    seed = draw_placement(sample.row.seed, generator.section).background_seed
    assert sample.image.size == (SIZE, SIZE)
    assert np.all(image[~mask] == (0, seed % 256, 200))

    folder_and_source = loaded("cut_paste", make_settings(str(tmp_path)), make_instance(), tmp_path,
                               background_source=solid)
    with pytest.raises(ValueError, match="also given"):
        folder_and_source.sample(rows_for(1))


def test_base_model_backgrounds_draw_one_batch_with_scene_prompts(tmp_path):
    class FakeSampler:
        def __init__(self):
            self.calls = []

        def sample(self, rows):
            from persrep.generation.base import SampledImage

            self.calls.append(rows)
            return [SampledImage(Image.new("RGB", (32, 32), (r.seed % 256, 0, 0)), None, r) for r in rows]

    sampler = FakeSampler()
    generator = loaded("cut_paste", make_settings("generated"), make_instance(), tmp_path,
                       background_source=BaseModelBackgrounds(sampler, cfg=5.0))
    generator.sample(rows_for(4))
    assert len(sampler.calls) == 1 and len(sampler.calls[0]) == 4
    for row in sampler.calls[0]:
        assert row.prompt in BACKGROUND_PROMPTS and IDENTIFIER not in row.prompt and row.cfg == 5.0


def test_cut_paste_refuses_negative_rows_and_foreign_instances(background_dir, tmp_path):
    generator = loaded("cut_paste", make_settings(str(background_dir)), make_instance(), tmp_path)
    with pytest.raises(ValueError, match="positives only"):
        generator.sample(rows_for(2, role="negative"))
    with pytest.raises(ValueError, match="bag_2"):
        generator.sample([SampleRow("bag_2", "positive", "cut_paste", "", 0.0, seed=1)])


# ---------------------------------------------------------------------------------------------
# real-only
def test_real_only_returns_the_real_photos_in_turn(tmp_path):
    instance = make_instance()
    generator = loaded("real_only", make_settings("generated"), instance, tmp_path)
    samples = generator.sample(rows_for(7, generator="real_only"))
    for i, sample in enumerate(samples):
        assert sample.image.tobytes() == instance.train_images[i % 3].tobytes()
        assert sample.mask.tobytes() == instance.train_masks[i % 3].tobytes()
    unmasked = loaded("real_only", make_settings("generated"), make_instance(with_masks=False), tmp_path)
    assert all(s.mask is None for s in unmasked.sample(rows_for(2, generator="real_only")))


def test_real_only_refuses_negatives_and_needs_load(tmp_path):
    generator = get_generator("real_only", make_settings("generated"))
    assert generator.needs_training is False
    with pytest.raises(RuntimeError, match="load"):
        generator.sample(rows_for(1, generator="real_only"))
    generator.load(generator.prepare(make_instance(), tmp_path))
    with pytest.raises(ValueError, match="negatives come from the base diffusion model"):
        generator.sample(rows_for(2, generator="real_only", role="negative"))


def test_artifact_is_self_contained_and_keyed_by_the_photos(tmp_path):
    settings = make_settings("generated")
    maker = get_generator("real_only", settings)
    artifact = maker.prepare(make_instance(), tmp_path)
    assert artifact.key == maker.artifact_key(make_instance())
    assert maker.prepare(make_instance(), tmp_path).files == artifact.files  # deterministic bytes
    changed = make_instance()
    changed.train_images[0] = changed.train_images[0].rotate(90)
    assert maker.artifact_key(changed) != artifact.key
    # another process: a fresh generator needs only the published artifact
    fresh = get_generator("real_only", settings)
    fresh.load(artifact)
    assert fresh.sample(rows_for(1, generator="real_only"))[0].image.tobytes() == \
        make_instance().train_images[0].tobytes()
    with pytest.raises(ValueError, match="given to 'cut_paste'"):
        get_generator("cut_paste", settings).load(artifact)


def test_one_data_path_resolver_for_generators_and_the_run_context(tmp_path, monkeypatch):
    """``@data/`` means the same everywhere; the run context also makes local paths absolute."""
    from persrep.data.layout import resolve_data_path as layout_resolve
    from persrep.pipeline.context import RunContext

    assert resolve_data_path is layout_resolve
    ctx = RunContext.__new__(RunContext)
    object.__setattr__(ctx, "data_path", "s3://bucket/pods/")  # the context is frozen once built
    assert ctx.resolve_data_path("@data/bg") == resolve_data_path("@data/bg", "s3://bucket/pods/") \
        == "s3://bucket/pods/bg"
    monkeypatch.chdir(tmp_path)
    assert ctx.resolve_data_path("rel/bg") == str(tmp_path / "rel" / "bg")
    assert ctx.resolve_data_path("s3://other/x") == "s3://other/x"
    assert resolve_data_path("rel/bg", None) == "rel/bg"  # generators: unchanged
