"""Pixel data of a stored instance: its frames as stored or decoded, and the whole instance
converted to the default syntax (Explicit VR Little Endian) when a client needs that.

Only what is asked for is read: a native frame is read at its offset in the file, a
compressed one is cut out of the encapsulated fragments.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from imagebridge.dicom.reports import to_part10

PIXEL_DATA = 0x7FE00010
BIG_ENDIAN = "1.2.840.10008.1.2.2"


class PixelError(ValueError):
    """Pixel data that cannot be given as asked, with the reason."""


class FrameNotFound(PixelError):
    """A frame number the instance does not have."""


def can_decode(transfer_syntax_uid: str) -> bool:
    """Whether this hub can turn pixel data in this syntax into plain pixel values."""
    uid = UID(transfer_syntax_uid)
    if not uid.is_compressed:
        return uid.is_transfer_syntax
    try:
        return bool(get_decoder(uid).is_available)
    except (NotImplementedError, ValueError):
        return False


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def read_dataset(fp: BinaryIO, transfer_syntax_uid: str) -> Dataset:
    """The stored dataset with its long values left on disk, read only when asked for."""
    fp.seek(0)
    # A deflated dataset is read whole: offsets into it are not offsets into the file.
    defer = None if UID(transfer_syntax_uid).is_deflated else 1024
    return dcmread(fp, defer_size=defer)


def frames(fp: BinaryIO, transfer_syntax_uid: str, numbers: list[int], decode: bool) -> list[bytes]:
    """The frames (1-based numbers) of the instance in ``fp``: as stored, or ``decode``d
    into little-endian pixel values (PS3.18's application/octet-stream)."""
    ds = read_dataset(fp, transfer_syntax_uid)
    if PIXEL_DATA not in ds:
        raise FrameNotFound("the instance has no pixel data")
    count = number_of_frames(ds)
    for n in numbers:
        if not 1 <= n <= count:
            raise FrameNotFound(f"frame {n} does not exist: the instance has {count}")
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if decode:
        arrays = (decode_frame(fp, ds, n - 1, raw=True) for n in numbers)
        return [bytes(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()) for a in arrays]
    if syntax.is_encapsulated:
        data = ds.PixelData
        return [get_frame(data, n - 1, number_of_frames=count) for n in numbers]
    return [_native_frame(fp, ds, n - 1) for n in numbers]


def decode_frame(fp: BinaryIO, ds: Dataset, index: int, *, raw: bool) -> NDArray[Any]:
    """One frame's pixel values (``raw``: in the stored colour space, not made RGB)."""
    deflated = UID(str(ds.file_meta.TransferSyntaxUID)).is_deflated
    fp.seek(0)
    try:
        # A deflated dataset was read whole; otherwise the decoder reads just this frame.
        return pixel_array(ds if deflated else fp, index=index, raw=raw)
    except Exception as exc:  # decoders raise many kinds on data they cannot read
        raise PixelError(f"cannot decode the pixel data: {type(exc).__name__}") from exc


def _native_frame(fp: BinaryIO, ds: Dataset, index: int) -> bytes:
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    if bits == 1:
        # Frames of one-bit data need not start on a byte: unpack, cut, pack again.
        unpacked = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")
        frame = unpacked[index * pixels : (index + 1) * pixels]
        return bytes(np.packbits(frame, bitorder="little").tobytes())
    length = pixels * bits // 8
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if isinstance(raw, RawDataElement) and raw.value is None:
        fp.seek(raw.value_tell + index * length)
        data = fp.read(length)
    else:
        data = ds.PixelData[index * length : (index + 1) * length]
    if len(data) != length:
        raise PixelError("the pixel data is shorter than its frames")
    return bytes(data)


def can_convert(transfer_syntax_uid: str) -> bool:
    """Whether an instance in this syntax can be rewritten in Explicit VR Little Endian
    (big-endian pixel data would need swapping that the writer does not do)."""
    return transfer_syntax_uid != BIG_ENDIAN and can_decode(transfer_syntax_uid)


def to_explicit_little_endian(fp: BinaryIO) -> bytes:
    """The instance as a Part 10 file in Explicit VR Little Endian, pixel data decoded."""
    fp.seek(0)
    try:
        ds = dcmread(fp)
        syntax = UID(str(ds.file_meta.TransferSyntaxUID))
        if syntax.is_compressed:
            # The same instance in another syntax keeps its SOP Instance UID.
            ds.decompress(generate_instance_uid=False)
        ds.file_meta = FileMetaDataset()
        return to_part10(ds)
    except Exception as exc:  # decoders raise many kinds on data they cannot read
        raise PixelError(f"cannot convert the instance: {type(exc).__name__}") from exc
