"""Which plane of a microscope file becomes the image the model sees: the nuclear channel, a single colour, Z and T.

Labs write channel stacks (CYX, ZCYX, TZCYX ...), RGB exports with the stain in one colour, and RGB H&E. Here:
- a channel axis (C) gives its nuclear channel: the one asked for (`--nuclear-channel NAME|INDEX`), else the one whose
  name is a nuclear stain (DAPI, Hoechst, ...), else channel 0, and the note says which and why;
- an RGB image whose signal sits in one colour (a DAPI export in blue, a green nuclear protein) becomes that colour's
  grey image: fluorescence, not stained tissue. RGB with real colour (H&E) stays colour;
- Z is projected to its maximum (every nucleus of the stack, in focus somewhere), T and other axes give their first
  plane; the note says so.
Pure numpy: axes use tifffile's letters (Y, X, S samples, C channels, Z, T, anything else another axis).
"""
from __future__ import annotations

import re

import numpy as np

NUCLEAR_STAIN = re.compile(r"dapi|hoechst|h\s*-?\s*33[0-9]{3}|\bhst\b|draq|nuc|sytox|syto|propidium|\bpi\b|to-?pro|"
                           r"\bdna\b|h2b|histone|nuclei|nucleus", re.IGNORECASE)
COLOURS = ("red", "green", "blue")
LIVE_CHANNEL = 0.05  # a colour channel whose spread is under this fraction of the widest one's carries no signal
SAME_SIGNAL_R2 = 0.98  # colour channels that are one signal times a factor (a pseudo-colour lookup table)
GREY_DISTANCE = 2.0  # mean distance from grey (0-255, for a full-range image) under which RGB is grey already


def guess_axes(shape: tuple[int, ...]) -> str:
    """Axes of an array given without names: YX, YXS (last axis of 2-4: colour samples), else CYX, ZCYX, TZCYX."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[2] <= 4:
        return "YXS"
    if len(shape) > 5 or len(shape) < 2:
        raise ValueError(f"an array of shape {shape}: give YX, YXC (up to 4 colours) or CYX / ZCYX / TZCYX")
    return "TZCYX"[-len(shape):]


def choose_channel(names: list[str], count: int, asked: str = "") -> tuple[int, str]:
    """(index, note) of the nuclear channel among `count`: `asked` (a name, case-insensitive, or an index), else the
    first name that is a nuclear stain, else 0. Raises ValueError when `asked` matches no channel."""
    label = (lambda i: f"{i} '{names[i]}'") if len(names) == count else str
    if asked != "":
        if asked.lstrip("-").isdigit():
            index = int(asked)
            if not -count <= index < count:
                raise ValueError(f"--nuclear-channel {asked}: the image has {count} channels (0-{count - 1})")
            index %= count
            return index, f"channel {label(index)} of {count} (asked)"
        lowered = [name.lower() for name in names]
        if asked.lower() in lowered:
            index = lowered.index(asked.lower())
            return index, f"channel {label(index)} of {count} (asked)"
        shown = ", ".join(f"'{name}'" for name in names) if names else "none"
        raise ValueError(f"--nuclear-channel {asked!r}: no channel of that name (names: {shown})")
    for index, name in enumerate(names[:count] if len(names) == count else []):
        if NUCLEAR_STAIN.search(name):
            return index, f"channel {label(index)} of {count} (nuclear stain by name)"
    why = "no name is a nuclear stain" if len(names) == count else "no channel names"
    return 0, f"channel {label(0)} of {count} ({why}: --nuclear-channel picks another)"


def _sample(rgb: np.ndarray, count: int = 20000) -> np.ndarray:
    """About `count` pixels of an RGB image on a regular grid, as float32 rows (no copy of the whole image)."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / count)))
    return rgb[::step, ::step].reshape(-1, rgb.shape[-1]).astype(np.float32)


def _live_colours(pixels: np.ndarray) -> tuple[list[int], bool]:
    """(colour channels that carry signal, whether they carry one signal times a factor) of sampled RGB pixels."""
    low, high = np.percentile(pixels, [0.5, 99.5], axis=0)
    spread = high - low
    if spread.max() <= 0:
        return [], True
    live = [int(c) for c in np.flatnonzero(spread > LIVE_CHANNEL * spread.max())]
    if len(live) == 1:
        return live, True
    signal = pixels[:, live] - low[live]
    brightest = signal[:, int(np.argmax(spread[live]))]
    power = float(brightest @ brightest)
    for column in signal.T:  # each live channel ~ factor x the brightest one (least squares through the origin)
        factor = float(column @ brightest) / power if power else 0.0
        residual = column - factor * brightest
        total = float(((column - column.mean()) ** 2).sum())
        if total and 1.0 - float(residual @ residual) / total < SAME_SIGNAL_R2:
            return live, False
    return live, True


def colour_choice(rgb: np.ndarray) -> str:
    """'keep' for a grey or colour RGB image, else the colours that carry its one signal ('blue', 'green+blue')."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 20000)))
    grid = rgb[::step, ::step]
    if np.array_equal(grid[..., 0], grid[..., 1]) and np.array_equal(grid[..., 1], grid[..., 2]):
        return "keep"  # grey (most microscopy RGB files): nothing to measure
    sample = _sample(rgb, 5000)
    red, green, blue = sample.T
    grey = (red + green + blue) / 3
    distance = float((np.abs(red - grey) + np.abs(green - grey) + np.abs(blue - grey)).mean() / 3)
    if distance * 255.0 <= GREY_DISTANCE * max(float(sample.max()), 1.0):  # grey already, for its brightness
        return "keep"
    live, one_signal = _live_colours(sample)
    return "+".join(COLOURS[c] for c in live) if live and one_signal else "keep"


def single_colour(rgb: np.ndarray, choice: str = "auto") -> tuple[np.ndarray | None, str]:
    """(grey image, note) when an RGB image's signal is in one colour (or one signal in several, as a lookup table
    draws it), else (None, ''): grey and colour images stay as they are. `choice`: colour_choice's answer made on
    the whole image, for a window of it ('auto': decide on this array)."""
    choice = colour_choice(rgb) if choice == "auto" else choice
    if choice == "keep":
        return None, ""
    live = [COLOURS.index(colour) for colour in choice.split("+")]
    if len(live) == 1:
        return np.ascontiguousarray(rgb[..., live[0]]), f"{choice} of RGB (the signal is in one colour)"
    return rgb[..., live].max(axis=-1), f"{choice} of RGB (one signal in a colour lookup table)"


def _reduce_other_axes(array: np.ndarray, axes: str) -> tuple[np.ndarray, str, str]:
    """(array with only Y, X, S, C axes, those axes, note): Z projected to its maximum, anything else its first plane."""
    notes = []
    for axis in [a for a in axes if a not in "YXSC"]:
        position = axes.index(axis)
        count = array.shape[position]
        if count > 1 and axis == "Z":
            array = array.max(axis=position)
            notes.append(f"z: maximum of {count} planes")
        else:
            array = np.take(array, 0, axis=position)
            if count > 1:
                notes.append(f"{'t' if axis == 'T' else axis.lower()}: first of {count}")
        axes = axes.replace(axis, "", 1)
    return array, axes, "; ".join(notes)


def select_plane(array: np.ndarray, axes: str = "", names: list[str] | None = None,
                 asked: str = "", colours: str = "auto") -> tuple[np.ndarray, str, str]:
    """(YX grey or YX3 RGB array, channel note, plane note) of an array with named axes, values untouched.

    `names`: the channel axis' names from the file's metadata; `asked`: --nuclear-channel (a name or an index);
    `colours`: an RGB image's colour_choice, made on the whole image for a window of it ('auto': made here)."""
    array = np.asarray(array)
    axes = (axes or guess_axes(array.shape)).upper()
    if len(axes) != array.ndim or "Y" not in axes or "X" not in axes:
        raise ValueError(f"axes {axes!r} do not fit an array of shape {array.shape}")
    names = [str(name) for name in (names or [])]
    names = names if any(name.strip() for name in names) else []
    array, axes, plane = _reduce_other_axes(array, axes)
    if "C" in axes and array.shape[axes.index("C")] == 1:
        array, axes = np.take(array, 0, axis=axes.index("C")), axes.replace("C", "")
    if "S" in axes and array.shape[axes.index("S")] == 1:
        array, axes = np.take(array, 0, axis=axes.index("S")), axes.replace("S", "")
    if "C" in axes and "S" not in axes and array.shape[axes.index("C")] in (3, 4) and not names and not asked \
            and array.dtype == np.uint8:
        axes = axes.replace("C", "S")  # an unnamed 8-bit stack of three or four: RGB(A) stored plane by plane
    note = ""
    if "C" in axes:
        index, note = choose_channel(names, array.shape[axes.index("C")], asked)
        array, axes = np.take(array, index, axis=axes.index("C")), axes.replace("C", "")
        asked = ""
    if "S" in axes:
        array = np.moveaxis(array, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
        samples = array.shape[-1]
        if asked != "":  # a colour of an RGB image, by index or colour name
            colours = [*COLOURS, "alpha"][:samples] if samples in (3, 4) else []
            index, note = choose_channel(colours, samples, asked)
            array, axes = array[..., index], axes[:-1]
        elif samples in (3, 4):
            array = array[..., :3]
        elif samples == 2:  # grey + alpha
            array, axes = array[..., 0], axes[:-1]
        else:
            index, note = choose_channel([], samples, "")
            array, axes = array[..., index], axes[:-1]
    if axes.replace("S", "") == "XY":
        array = np.swapaxes(array, 0, 1)
    if array.ndim == 3:
        grey, colour_note = single_colour(array, colours)
        if grey is not None:
            return grey, colour_note, plane
    return np.ascontiguousarray(array), note, plane
