"""Rendered images (PS3.18 8.3.5): one frame as JPEG or PNG, windowed for a person to look at.

Grey pixels go through the modality LUT (rescale) and then the VOI window: the one asked
for (`window=center,width,function`), else the instance's own, else the frame's range.
Colour pixels are shown as they are.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

from imagebridge.counts import whole_number
from imagebridge.dicomweb.media import JPEG
from imagebridge.dicomweb.pixels import PIXEL_DATA, FrameNotFound, decode_frame, number_of_frames

WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
MAX_VIEWPORT = 4096


class RenderingError(ValueError):
    """A rendering parameter the standard does not allow, with the reason."""


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "linear"


@dataclass(frozen=True)
class Rendering:
    media_type: str = JPEG
    window: Window | None = None
    quality: int = 90
    viewport: tuple[int, int] | None = None


def parse_window(value: str) -> Window:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 3:
        raise RenderingError("window is center,width,function")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError as exc:
        raise RenderingError("a window's center and width are numbers") from exc
    function = parts[2].lower()
    if function not in WINDOW_FUNCTIONS:
        raise RenderingError("a window's function is linear, linear-exact or sigmoid")
    if width < (1 if function == "linear" else 0) or (function != "linear" and width == 0):
        raise RenderingError("a window's width is at least 1 (linear) or above 0")
    return Window(center, width, function)


def parse_quality(value: str) -> int:
    quality = whole_number(value, 1, 100)
    if quality is None:
        raise RenderingError("quality is a whole number from 1 to 100")
    return quality


def parse_viewport(value: str) -> tuple[int, int]:
    sizes = [whole_number(p.strip(), 1, MAX_VIEWPORT) for p in value.split(",")]
    if len(sizes) != 2 or sizes[0] is None or sizes[1] is None:
        raise RenderingError(f"viewport is width,height in pixels, each 1 to {MAX_VIEWPORT}")
    return sizes[0], sizes[1]


def render(fp: BinaryIO, header: Dataset, frame: int, how: Rendering) -> bytes:
    """Frame ``frame`` (1-based) of the instance in ``fp`` as an image of ``how.media_type``."""
    if PIXEL_DATA not in header:
        raise FrameNotFound("the instance has no pixel data")
    count = number_of_frames(header)
    if not 1 <= frame <= count:
        raise FrameNotFound(f"frame {frame} does not exist: the instance has {count}")
    pixels = decode_frame(fp, header, frame - 1, raw=False)
    image = Image.fromarray(_displayable(pixels, header, how.window))
    if how.viewport is not None:
        image.thumbnail(how.viewport)
    out = io.BytesIO()
    if how.media_type == JPEG:
        image.save(out, "JPEG", quality=how.quality)
    else:
        image.save(out, "PNG")
    return out.getvalue()


def _displayable(
    pixels: NDArray[np.generic], ds: Dataset, window: Window | None
) -> NDArray[np.uint8]:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        bits = 8 if int(pixels.max()) <= 255 else 16  # the palette's own depth
    if pixels.ndim == 3:
        # Colour: as it is, scaled to 8 bits if stored wider.
        scaled: NDArray[np.float64] = pixels.astype(np.float64) * (255.0 / (2**bits - 1))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    window = window or _own_window(ds) or _range_window(values)
    grey = _apply_window(values, window)
    if photometric == "MONOCHROME1":
        grey = 255.0 - grey
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _own_window(ds: Dataset) -> Window | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        # Several windows may be given; the first is the one to show first.
        c = float(center[0] if isinstance(center, MultiValue) else center)
        w = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").lower().replace("_", "-")
    if function not in WINDOW_FUNCTIONS or w <= 0 or (function == "linear" and w < 1):
        return None
    return Window(c, w, function)


def _range_window(values: NDArray[np.float64]) -> Window:
    low, high = float(values.min()), float(values.max())
    return Window((low + high) / 2 + 0.5, max(high - low + 1, 1), "linear")


def _apply_window(x: NDArray[np.float64], w: Window) -> NDArray[np.float64]:
    """PS3.3 C.11.2.1.2: the VOI LUT functions, onto 0..255."""
    if w.function == "sigmoid":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - w.center) / w.width))
    if w.function == "linear-exact":
        return np.clip((x - w.center) / w.width + 0.5, 0, 1) * 255.0
    # linear: the centre is offset by half a unit and the width by one, as the standard says.
    return np.clip((x - (w.center - 0.5)) / (w.width - 1 or 1) + 0.5, 0, 1) * 255.0
