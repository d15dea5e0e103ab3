import hashlib
import io
import json

import cv2
import numpy as np
import pytest
from conftest import FIXTURES, fixture_images, read_bgr

from smearscan.preprocess import (
    ImageDecodeError,
    Recipe,
    cell_box,
    decode_image,
    load_and_preprocess,
    preprocess,
    read_image,
)


def test_decoding_is_pixel_exact_against_the_dataset_manifest():
    manifest = (FIXTURES / "cnmc-manifest.csv").read_text().splitlines()[1:]
    expected = {line.split(",")[0].rsplit("/", 1)[1]: line.split(",")[5] for line in manifest}
    for path in fixture_images():
        rgb = read_image(path)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        assert hashlib.sha256(bgr.tobytes()).hexdigest() == expected[path.name]


@pytest.mark.parametrize("suffix", [".bmp", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".webp"])
def test_every_lab_format_decodes_to_rgb(tmp_path, suffix):
    source = fixture_images()[0]
    target = tmp_path / f"cell{suffix.upper()}"
    assert cv2.imwrite(str(target), read_bgr(source))
    rgb = read_image(target)
    assert rgb.shape == (450, 450, 3) and rgb.dtype == np.uint8
    reference = read_image(source)
    if suffix in (".jpg", ".jpeg"):
        assert np.abs(rgb.astype(int) - reference).mean() < 3
    else:
        assert np.array_equal(rgb, reference)


def test_depth_and_channel_conversions():
    bgr = read_bgr(fixture_images()[0])
    reference = bgr[:, :, ::-1]
    ok, png16 = cv2.imencode(".png", bgr.astype(np.uint16) * 257)
    assert np.array_equal(decode_image(png16.tobytes()), reference)
    ok, gray = cv2.imencode(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    rgb = decode_image(gray.tobytes())
    assert rgb.shape == (450, 450, 3) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
    ok, rgba = cv2.imencode(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    assert np.array_equal(decode_image(rgba.tobytes()), reference)


def test_palette_png_is_converted(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rgb = read_image(fixture_images()[0])
    path = tmp_path / "palette.png"
    image_module.fromarray(rgb).convert("P").save(path)
    decoded = read_image(path)
    assert decoded.shape == (450, 450, 3)
    assert np.abs(decoded.astype(int) - rgb).mean() < 12


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"GIF89a not really", "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a decodable image"),
    ],
)
def test_unusable_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_file_is_an_error():
    ok, png = cv2.imencode(".png", read_bgr(fixture_images()[0]))
    with pytest.raises(ImageDecodeError):
        decode_image(png.tobytes()[: len(png) // 2])


def test_pixel_limit_refuses_large_images():
    ok, png = cv2.imencode(".png", np.zeros((300, 400), np.uint8))
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(png.tobytes(), max_pixels=100_000)
    assert decode_image(png.tobytes(), max_pixels=120_000).shape == (300, 400, 3)


def test_decompression_bomb_is_refused_from_its_header():
    # 9000 x 9000 = 81 MP in a file of ~80 kB, over the default 64 MP ceiling
    ok, png = cv2.imencode(".png", np.zeros((9000, 9000), np.uint8))
    assert len(png) < 1_000_000
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(png.tobytes())


@pytest.mark.parametrize("big_tiff", [False, True])
def test_a_tiff_of_several_cells_is_refused_and_a_thumbnail_is_not_a_cell(big_tiff):
    """OpenCV decodes a TIFF's first image and says nothing of the others: a file of several
    cells is an error row, not one cell's label. A reduced-resolution copy (a thumbnail,
    NewSubfileType bit 0) is not a second cell."""
    from PIL import Image, TiffImagePlugin

    cells = [Image.fromarray(read_image(path)) for path in fixture_images()[:3]]

    def tiff(first, *more) -> bytes:
        out = io.BytesIO()
        first.save(out, format="TIFF", big_tiff=big_tiff, save_all=True, append_images=more)
        return out.getvalue()

    assert tiff(cells[0])[:4] == (b"II+\x00" if big_tiff else b"II*\x00")
    assert decode_image(tiff(cells[0])).shape == (450, 450, 3)
    with pytest.raises(ImageDecodeError, match="a TIFF of 2 or more images"):
        decode_image(tiff(*cells))
    thumbnail = cells[0].resize((64, 64))
    reduced = TiffImagePlugin.ImageFileDirectory_v2()
    reduced[254] = 1  # NewSubfileType: a reduced-resolution version of the image
    thumbnail.encoderinfo = {"tiffinfo": reduced}
    with_thumbnail = tiff(cells[0], thumbnail)
    assert TiffImagePlugin.TiffImageFile(io.BytesIO(with_thumbnail)).n_frames == 2
    np.testing.assert_array_equal(decode_image(with_thumbnail), read_image(fixture_images()[0]))


def test_read_errors_have_reasons(tmp_path):
    with pytest.raises(ImageDecodeError, match="vanished"):
        read_image(tmp_path / "gone.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        read_image(tmp_path)


@pytest.mark.parametrize("crop", ["full", "bbox", "window"])
def test_preprocess_output(crop):
    recipe = Recipe(crop=crop)
    out = load_and_preprocess(fixture_images()[0], recipe)
    assert out.shape == (128, 128, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.2


def box_of(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """The cell's box at the recipe's background threshold; the frame is not empty."""
    box = cell_box(rgb, 12)
    assert box is not None
    return box


def test_bbox_crop_fills_the_frame_with_the_cell():
    rgb = read_image(fixture_images()[0])
    x, y, w, h = box_of(rgb)
    assert w * h < 0.5 * rgb.shape[0] * rgb.shape[1]  # the crop has a black margin
    framed = preprocess(rgb, Recipe(crop="bbox", margin=0.0))
    x2, y2, w2, h2 = box_of((framed * 255).astype(np.uint8))
    assert max(w2, h2) >= 120  # the cell's long side spans the model input


def test_window_crop_keeps_scale():
    rgb = read_image(fixture_images()[0])
    _, _, w, h = box_of(rgb)
    framed = preprocess(rgb, Recipe(crop="window", window=320))
    _, _, w2, h2 = box_of((framed * 255).astype(np.uint8))
    assert abs(w2 - w * 128 / 320) <= 3


def test_log_enhancement_changes_edges_only_moderately():
    rgb = read_image(fixture_images()[0])
    plain = preprocess(rgb, Recipe())
    enhanced = preprocess(rgb, Recipe(log_enhance=True))
    assert not np.array_equal(plain, enhanced)
    assert np.abs(plain - enhanced).mean() < 0.1


def test_recipe_json_round_trip_and_validation():
    recipe = Recipe(crop="window", window=300, log_enhance=True)
    assert Recipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(ValueError, match="unknown"):
        Recipe.from_json(json.dumps({**json.loads(recipe.to_json()), "sharpen": 1}))
    with pytest.raises(ValueError, match="newer"):
        Recipe.from_json(json.dumps({**json.loads(recipe.to_json()), "version": 99}))
    with pytest.raises(ValueError, match="crop"):
        Recipe(crop="zoom")


@pytest.mark.parametrize(
    "recipe", [Recipe(), Recipe(crop="bbox"), Recipe(crop="full"), Recipe(log_enhance=True)]
)
def test_bgr_fast_path_gives_identical_inputs(tmp_path, recipe):
    """Scanning and training decode to BGR and swap channels after resizing; that must give
    bit-identical model inputs to preprocessing the RGB image, for every kind of file."""
    bgr = read_bgr(fixture_images()[0])
    variants = {
        "colour.bmp": bgr,
        "gray.png": cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY),
        "deep.png": bgr.astype(np.uint16) * 257,
        "alpha.png": cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA),
        "colour.tif": bgr,
    }
    for name, array in variants.items():
        path = tmp_path / name
        cv2.imwrite(str(path), array)
        expected = preprocess(read_image(path), recipe)
        assert np.array_equal(load_and_preprocess(path, recipe), expected), name
    for path in fixture_images():
        assert np.array_equal(
            load_and_preprocess(path, recipe), preprocess(read_image(path), recipe)
        )


def test_recipe_numbers_are_bounded():
    for bad in (
        {"input_size": 40000},
        {"window": 0},
        {"margin": -1.0},
        {"input_size": "128"},
        {"background_threshold": 300},
    ):
        with pytest.raises(ValueError):
            Recipe(**bad)
    assert Recipe.from_json(json.dumps({**json.loads(Recipe().to_json()), "extra": {}})) == Recipe()


@pytest.mark.parametrize(
    ("maximum", "bits"), [(255, 8), (1023, 10), (4095, 12), (9000, 14), (28013, 16), (65535, 16)]
)
def test_sensor_bit_depth_of_deep_images(maximum, bits):
    from smearscan.preprocess import sensor_bits

    assert sensor_bits(maximum) == bits


REFERENCE = FIXTURES / "preprocessed-reference.npz"


def _model_pixels_of_fixtures(recipe) -> np.ndarray:
    from smearscan.preprocess import framed_and_resized, gray_of, model_pixels, read_image

    crops = []
    for path in fixture_images():
        image = read_image(str(path), order="bgr")
        framed = framed_and_resized(image, recipe, "bgr", gray_of(image, "bgr"))
        crops.append(model_pixels(framed, recipe))
    return np.stack(crops)


def test_preprocessing_matches_the_stored_reference_crops():
    """Issue 21: area resizing can change between OpenCV releases, and every figure of the
    model was measured on one. The 24 fixture crops, preprocessed with the shipped recipe,
    must equal the stored reference exactly (made with OpenCV 5.1.0.95, identical on
    5.0.0.93); a new OpenCV that changes them fails here, before it changes any label.
    Regenerate only after re-validating the model: ``python tests/test_preprocess.py``."""
    from smearscan.inference import load_classifier

    recipe = load_classifier(device="cpu").info.recipe
    stored = np.load(REFERENCE)
    assert str(stored["recipe"]) == recipe.to_json()
    pixels = _model_pixels_of_fixtures(recipe)
    difference = np.abs(pixels.astype(int) - stored["pixels"].astype(int))
    assert difference.max() == 0, (
        f"OpenCV {cv2.__version__} preprocesses differently from {stored['opencv']}: "
        f"{(difference > 0).mean():.2%} of pixels differ, by up to {difference.max()}; "
        "install the validated set (pip install -c constraints.txt) or re-validate"
    )


if __name__ == "__main__":
    from smearscan.inference import load_classifier

    shipped = load_classifier(device="cpu").info.recipe
    np.savez_compressed(
        REFERENCE,
        pixels=_model_pixels_of_fixtures(shipped),
        recipe=np.array(shipped.to_json()),
        opencv=np.array(cv2.__version__),
    )


def test_a_model_input_kept_as_uint8_comes_back_exactly():
    """Issue 23.5: one home for the model-input scale; training caches and the shift suite
    keep inputs as uint8 and must get the scanner's float input back, bit for bit."""
    from smearscan.preprocess import stored_uint8, unit_range

    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(stored_uint8(unit_range(every_value)), every_value)
    assert unit_range(every_value).dtype == np.float32
    assert unit_range(every_value).max() == np.float32(1.0)
