"""Readers that turn one file into one raw item: text files, images, PCM WAV audio (stdlib ``wave`` + numpy)."""

from __future__ import annotations

import csv
import math
import sys
import wave
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_text(path: str | Path) -> str:
    """Decode a text file as UTF-8 (a BOM is dropped); files that are not valid UTF-8 are read as Windows-1252.

    The BBC corpus, for example, is UTF-8 except for a few files with a raw ``0xA3`` byte (``£`` in cp1252).
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def read_table(
    path: str | Path, columns: tuple[str, ...], layout: str, delimiter: str = ","
) -> list[dict[str, str]]:
    """Rows of a CSV/TSV file with a header, as dicts; errors name the file, the missing columns and ``layout``.

    TSV (``delimiter="\\t"``) is read without quote handling (GLUE style: quotes are literal text).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}; expected {layout}")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file, delimiter=delimiter, quoting=quoting)
            header = reader.fieldnames or []
            missing = [column for column in columns if column not in header]
            if missing:
                raise ValueError(f"{path} lacks column(s) {missing} (header: {header}); expected {layout}")
            rows = list(reader)
    except UnicodeDecodeError as error:
        raise ValueError(not_utf8(path, error)) from None
    if not rows:
        raise ValueError(f"{path} has a header but no rows; expected {layout}")
    for number, row in enumerate(rows, start=2):
        if any(row.get(column) is None for column in columns):
            raise ValueError(f"{path} line {number} has fewer fields than the header {header}")
    return rows


def not_utf8(path: str | Path, error: UnicodeDecodeError) -> str:
    """The message for a file that is not UTF-8 text: the file, the byte offset and what to do."""
    return (f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def open_rgb(path: str | Path):
    """Open an image file as an RGB ``PIL.Image.Image`` (decoded now, file closed)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def array_to_image(array: np.ndarray):
    """``(H, W, 3)`` uint8 array -> RGB ``PIL.Image.Image``."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))


def read_wav(path: str | Path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file as a mono ``float32`` waveform in ``[-1, 1]``, resampled to ``sample_rate`` if needed.

    Integer PCM of 8 (unsigned), 16, 24 or 32 bits is scaled by ``2**(bits-1)``; several channels are averaged.
    Returns ``(waveform of shape (T,), rate in Hz)``; ``rate == sample_rate`` unless ``sample_rate`` is ``None``
    (then the file's own rate). See :func:`resample`.
    """
    try:
        with wave.open(str(path), "rb") as file:
            channels, width, rate = file.getnchannels(), file.getsampwidth(), file.getframerate()
            raw = file.readframes(file.getnframes())
    except (wave.Error, EOFError) as error:
        message = f"cannot read {path} as a PCM WAV file ({error}); expected 8/16/24/32-bit integer PCM"
        raise ValueError(message) from error
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = ((value << 8) >> 8).astype(np.float32) / float(2**23)  # sign-extend 24 -> 32 bits
    elif width == 4:
        samples = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(2**31)
    else:
        raise ValueError(f"{path} has {8 * width}-bit samples; expected 8, 16, 24 or 32-bit integer PCM")
    waveform = samples.reshape(-1, channels).mean(axis=1).astype(np.float32)
    if sample_rate is None or sample_rate == rate:
        return waveform, rate
    return resample(waveform, rate, sample_rate), int(sample_rate)


def read_waveform(path: str | Path, sample_rate: int | None = None) -> np.ndarray:
    """Just the ``(T,)`` float32 waveform of :func:`read_wav` (a picklable ``RawDataset.load`` via ``partial``)."""
    return read_wav(path, sample_rate)[0]


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample a ``(T,)`` waveform from ``orig_rate`` to ``target_rate`` Hz -> ``(ceil(T * target / orig),)``.

    Uses ``scipy.signal.resample_poly`` (polyphase FIR, anti-aliased) with ``up/down = target/orig`` reduced by
    their gcd (44100 -> 16000 is up=160, down=441); without scipy, falls back to linear interpolation (no
    anti-aliasing filter). Returns float32.
    """
    if orig_rate == target_rate:
        return waveform.astype(np.float32, copy=False)
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    try:
        from scipy.signal import resample_poly
    except ImportError:
        n_out = int(math.ceil(len(waveform) * target_rate / orig_rate))
        positions = np.arange(n_out) * (orig_rate / target_rate)
        return np.interp(positions, np.arange(len(waveform)), waveform).astype(np.float32)
    g = math.gcd(int(orig_rate), int(target_rate))
    return resample_poly(waveform, int(target_rate) // g, int(orig_rate) // g).astype(np.float32)
