"""Images as labs write them: any bit depth, the nuclear channel of a stack, one-colour exports, Z and T axes,
pixel sizes in any unit, and broken metadata, each read into the model's image with what was chosen said."""
import io

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.io.channels import choose_channel, select_plane
from pipeline.io.images import BadImageError, image_from_array, intensity_to_uint8, read_image


def tiff(array, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def nuclei_image(seed=0, size=(96, 128)) -> np.ndarray:
    """A grey 8-bit image of bright blobs on a dark background."""
    rng = np.random.default_rng(seed)
    image = np.full(size, 12, np.float32)
    for _ in range(12):
        y, x = rng.integers(8, size[0] - 8), rng.integers(8, size[1] - 8)
        cv2.circle(image, (int(x), int(y)), int(rng.integers(4, 8)), float(rng.integers(120, 250)), -1)
    return np.clip(image + rng.normal(0, 3, size), 0, 255).astype(np.uint8)


def test_12_bit_data_in_16_bits_and_a_camera_offset_read_as_their_8_bit_export():
    grey = nuclei_image()
    for raw in (grey.astype(np.uint16) * 16, (33_000 + 15 * grey.astype(np.uint32)).astype(np.uint16)):
        decoded = read_image(tiff(raw))
        stretched, _ = intensity_to_uint8(grey.astype(np.float32))  # the 8-bit image, stretched the same way
        assert decoded.intensity.startswith("uint16") and decoded.image.shape == (*grey.shape, 3)
        assert np.abs(decoded.image[..., 0].astype(int) - stretched.astype(int)).max() <= 1
    assert read_image(cv2.imencode(".png", grey)[1].tobytes()).intensity == ""  # 8-bit: as it is, no cost


def test_a_dim_8_bit_image_is_stretched_like_its_16_bit_original_and_keeps_its_kind():
    """A quarter-brightness 8-bit export (99.9th percentile under 128) is stretched at reading, so a dim bright-field
    image is still bright-field (its light background is under 128 as it is); an in-range image is left as it is."""
    from pipeline.data.protocol import image_kind

    def png(array) -> bytes:
        return cv2.imencode(".png", array)[1].tobytes()

    grey = nuclei_image()
    dim = read_image(png(grey // 4))
    deep = read_image(tiff(grey.astype(np.uint16) * 16))
    assert dim.intensity.startswith("dim uint8") and deep.intensity.startswith("uint16")
    assert np.abs(dim.image.astype(int) - deep.image.astype(int)).max() <= 8  # the dim file's 4-level steps
    bright_field = 255 - grey
    assert image_kind(read_image(png(bright_field // 4)).image) == "bright-field"
    assert image_kind(cv2.cvtColor(bright_field // 4, cv2.COLOR_GRAY2RGB)) == "fluorescence"  # unstretched: wrong
    assert read_image(png(grey)).intensity == "" and read_image(png(bright_field)).intensity == ""
    from pipeline.io.images import encode_png
    from pipeline.io.synthetic import render_sample

    tinted = read_image(encode_png(render_sample(3, 1, with_masks=False).image))  # dim, tinted, with noise per colour
    assert tinted.intensity == "" and image_kind(tinted.image) == "fluorescence"  # colour as it is: stretched, it
    # would be colourful enough to pass for stained tissue


def test_float_signed_nan_flat_and_tiny_images_get_a_stated_choice():
    grey = nuclei_image().astype(np.float32)
    with_nan = grey.copy()
    with_nan[:3, :3] = np.nan
    decoded = image_from_array(with_nan)
    assert "9 NaN" in decoded.intensity and decoded.image[0, 0, 0] == 0
    assert np.array_equal(image_from_array(grey - 500).image, image_from_array(grey).image)  # signed, any offset
    assert "flat image" in image_from_array(np.full((5, 5), 7, np.uint16)).intensity
    assert image_from_array(np.array([[3]], np.uint16)).image.shape == (1, 1, 3)


def test_the_nuclear_channel_comes_from_its_name_the_flag_or_a_stated_default():
    assert choose_channel(["Actin", "DAPI"], 2) == (1, "channel 1 'DAPI' of 2 (nuclear stain by name)")
    assert choose_channel(["GFP", "Hoechst 33342", "RFP"], 3)[0] == 1
    assert choose_channel(["GFP", "mCherry"], 2) == (0, "channel 0 'GFP' of 2 (no name is a nuclear stain: "
                                                       "--nuclear-channel picks another)")
    assert choose_channel([], 2)[1].startswith("channel 0 of 2 (no channel names")
    assert choose_channel(["GFP", "mCherry"], 2, "mcherry")[0] == 1 and choose_channel([], 3, "-1")[0] == 2
    with pytest.raises(ValueError, match="no channel of that name"):
        choose_channel(["GFP"], 1, "DAPI")
    with pytest.raises(ValueError, match="has 2 channels"):
        choose_channel([], 2, "5")


def test_a_stack_gives_its_dapi_channel_whatever_its_axes_and_says_which_plane():
    grey = nuclei_image()
    actin = 255 - grey
    stack = np.stack([actin, grey])
    ome = read_image(tiff(stack, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["Actin", "DAPI"]}}))
    assert np.array_equal(ome.image[..., 0], grey) and "'DAPI'" in ome.channel
    channels_last = read_image(tiff(np.moveaxis(stack, 0, -1), planarconfig="contig", photometric="minisblack",
                                    metadata={"axes": "YXS"}))
    assert channels_last.image.shape == (*grey.shape, 3)
    asked = read_image(tiff(stack, ome=True, metadata={"axes": "CYX"}), channel="1")
    assert np.array_equal(asked.image[..., 0], grey) and "(asked)" in asked.channel
    zstack = np.stack([grey // 2, grey, grey // 3])[:, None]  # Z, C=1, Y, X
    five_d = np.stack([zstack, zstack // 2])  # T, Z, C, Y, X
    decoded = read_image(tiff(five_d, imagej=True, metadata={"axes": "TZCYX"}))
    assert decoded.plane == "t: first of 2; z: maximum of 3 planes"
    assert np.array_equal(decoded.image[..., 0], grey)
    with pytest.raises(BadImageError, match="no channel of that name"):
        read_image(tiff(stack, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["Actin", "DAPI"]}}),
                   channel="Hoechst")


def test_one_colour_exports_are_fluorescence_and_colour_stays_colour():
    from pipeline.data.protocol import image_kind

    grey = nuclei_image()
    blue = np.zeros((*grey.shape, 3), np.uint8)
    blue[..., 2] = grey
    plane, note, _ = select_plane(blue)
    assert np.array_equal(plane, grey) and note.startswith("blue of RGB")
    cyan = blue.copy()
    cyan[..., 1] = grey // 2  # a cyan lookup table: one signal in two colours
    assert np.array_equal(select_plane(cyan)[0], grey)
    assert image_kind(image_from_array(blue).image) == "fluorescence"
    stained = np.stack([200 - grey // 2, 150 - grey // 2, 190 - grey // 5], axis=-1).astype(np.uint8)
    stained[:, ::7] = (230, 120, 170)  # eosin-pink tissue beside the purple nuclei: two signals
    plane, note, _ = select_plane(stained)
    assert plane.shape == stained.shape and note == ""


def test_pixel_sizes_in_micrometres_and_millimetres_and_implausible_ones_said():
    from pipeline.io.units import pixel_size_from_tiff

    image = np.zeros((8, 8), np.uint8)
    assert pixel_size_from_tiff(tiff(image, resolution=(1 / 0.65, 1 / 0.65), resolutionunit="MICROMETER")) == \
        (pytest.approx(0.65), "TIFF resolution (µm)")
    assert pixel_size_from_tiff(tiff(image, resolution=(2000, 2000), resolutionunit="MILLIMETER"))[0] == \
        pytest.approx(0.5)
    for size in (0.0, 1e6):
        found, source = pixel_size_from_tiff(tiff(image, ome=True, metadata={"axes": "YX", "PhysicalSizeX": size}))
        assert found is None and source.startswith("ignored:")


def test_ome_tiff_ids_drop_the_whole_suffix(tmp_path):
    from pipeline.io.sources import list_images

    (tmp_path / "well_A1.ome.tif").write_bytes(tiff(np.zeros((2, 8, 8), np.uint16), ome=True,
                                                     metadata={"axes": "CYX"}))
    assert [ref.image_id for ref in list_images(str(tmp_path)).refs] == ["well_A1"]


def test_the_shipped_model_finds_the_same_nuclei_in_16_bit_dim_one_colour_and_stack_files(real_zip):
    """Real test-split images written as a lab's files (pipeline.data.shifts): each lossless variant, read from its
    bytes, scores within 0.01 of the plain 8-bit image with the shipped model and its stored settings; the dim one,
    which keeps a quarter of the grey levels, within 0.02 on these 8 images (the whole test split: 0.001)."""
    from pipeline.api import Segmenter
    from pipeline.data.datasets import protocol_refs
    from pipeline.labels.metric import image_score
    from pipeline.data.shifts import channel_stack, dim, one_colour, sixteen_bit
    from pipeline.io.sources import list_kaggle, load_sample, read_file

    refs = protocol_refs(list_kaggle(real_zip).refs)["test"][::15]  # 8 images, fluorescence and stained
    samples = [load_sample(ref) for ref in refs]
    segmenter = Segmenter.load("dsb2018")

    def mean_score(files) -> float:
        return float(np.mean([image_score(sample.labels, segmenter.segment(read_image(data).image))
                              for sample, data in zip(samples, files)]))

    plain = mean_score([read_file(ref, ref.image_path) for ref in refs])
    for shift, within in ((sixteen_bit, 0.01), (dim, 0.02), (one_colour, 0.01), (channel_stack, 0.01)):
        shifted = mean_score([shift(sample.image, sample.labels)[1] for sample in samples])
        assert abs(shifted - plain) <= within, (shift.__name__, shifted, plain)
