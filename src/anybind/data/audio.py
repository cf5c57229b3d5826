"""Open any audio reference as a mono float32 waveform at one sample rate, or fail with a DataError.

References (what a dataset index stores in its audio field, or what a caller passes):

- a path (str or Path), or ``file://path``: WAV, FLAC, OGG/Opus, AIFF, and MP3 where the
  installed libsndfile decodes it (1.1 and later), all through `soundfile`
- ``tar://<shard.tar>#<member>``: a member of an uncompressed WebDataset shard (`tar_members`)
- ``bytes`` or a binary file-like object (an upload)
- a numpy array: samples already at `sample_rate` (1-D, or 2-D with channels on the short axis)
- a tuple ``(array, sr)``: samples at rate `sr`, resampled here

Why each step is here:

- Channels are averaged (speech and sound encoders take mono) and the rate is converted with
  `scipy.signal.resample_poly` (exact rational ratio, deterministic: same input, same bytes).
- Items that would teach an encoder nothing are refused with the reason as the message, so
  feature extraction records them as skips and goes on: undecodable, empty, non-finite, silent
  (peak under `SILENT_PEAK`) and badly clipped (over `CLIPPED_SHARE` of the samples at full
  scale). The checks read the samples as decoded, before mixing and resampling, which would
  hide clipping and invent overshoot.
- soundfile and scipy are imported inside the functions: ``import anybind`` stays light.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnybindError, DataError, MissingDependencyError
from .tar_members import read_member

#: the file name endings a lister takes for audio (lower case)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")
#: a peak under this (about -60 dBFS) is silence: nothing for an encoder to hear
SILENT_PEAK = 1e-3
#: a sample at or over this magnitude is at full scale
FULL_SCALE = 0.999
#: over this share of the samples at full scale, the recording is badly clipped
CLIPPED_SHARE = 0.01
#: more than this many channels on the short axis of an array is not a channel axis
MAX_CHANNELS = 64


def is_audio(path: str | os.PathLike) -> bool:
    """True when the file name ends in one of `AUDIO_EXTENSIONS` (case-insensitive)."""
    return os.fspath(path).lower().endswith(AUDIO_EXTENSIONS)


def load_audio(ref: Any, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 samples of `ref` at `sample_rate` (1-D); DataError with the reason otherwise.

    >>> load_audio("speech.flac", 16000).shape  # doctest: +SKIP
    (52480,)
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise DataError(f"sample_rate must be a positive integer (Hz), not {sample_rate!r}")
    samples, rate = _decode(ref)
    check_samples(samples)
    return resample(to_mono(samples), rate or int(sample_rate), int(sample_rate))


def check_samples(samples: np.ndarray) -> None:
    """Refuse audio an encoder should not be fed: empty, non-finite, silent, badly clipped."""
    if samples.size == 0:
        raise DataError("empty audio")
    finite = np.isfinite(samples)
    if not finite.all():
        raise DataError(f"non-finite audio ({int((~finite).sum())} NaN or infinite samples)")
    magnitude = np.abs(samples)
    if float(magnitude.max()) < SILENT_PEAK:
        raise DataError("silent audio")
    share = float(np.count_nonzero(magnitude >= FULL_SCALE)) / magnitude.size
    if share > CLIPPED_SHARE:
        raise DataError(f"clipped audio ({100 * share:.1f}% of samples at full scale)")


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) -> frames, by the mean of the channels."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    return samples.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling by the exact ratio target/rate (float32 in, float32 out)."""
    if rate == target:
        return np.ascontiguousarray(samples, dtype=np.float32)
    try:
        from scipy.signal import resample_poly
    except ImportError as exc:
        raise MissingDependencyError("resampling audio", "scipy", extra="audio") from exc
    g = np.gcd(int(rate), int(target))
    out = resample_poly(samples.astype(np.float64), target // g, rate // g)
    return np.ascontiguousarray(out, dtype=np.float32)


# ---- decoding ---------------------------------------------------------------------------------
def _decode(ref: Any) -> tuple[np.ndarray, int | None]:
    """(samples as (frames,) or (frames, channels) float, rate); rate None means `sample_rate`."""
    if isinstance(ref, tuple):
        return _from_pair(ref)
    if isinstance(ref, np.ndarray):
        return _from_array(ref), None
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return _read_sound(io.BytesIO(bytes(ref)), "audio bytes")
    if isinstance(ref, Path):
        return _read_path(str(ref))
    if isinstance(ref, str):
        return _from_string(ref)
    if hasattr(ref, "read"):
        return _read_sound(io.BytesIO(_read_stream(ref)), getattr(ref, "name", None) or "audio upload")
    raise DataError(f"cannot open audio from a {type(ref).__name__}")


def _from_pair(ref: tuple) -> tuple[np.ndarray, int]:
    if len(ref) != 2 or not isinstance(ref[0], np.ndarray):
        raise DataError("an audio tuple must be (numpy array, sample rate)")
    rate = ref[1]
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise DataError(f"an audio tuple's sample rate must be a positive integer (Hz), not {rate!r}")
    return _from_array(ref[0]), int(rate)


def _from_array(arr: np.ndarray) -> np.ndarray:
    """Integers scaled to [-1, 1] by their type's range; 2-D arrays turned to (frames, channels)."""
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DataError(f"an audio array must hold real numbers, not {arr.dtype}")
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        half = (int(info.max) + 1) / (1 if info.min < 0 else 2)  # unsigned PCM is centred on half
        arr = (arr.astype(np.float64) - (0 if info.min < 0 else half)) / half
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2 and arr.shape[0] < arr.shape[1] and arr.shape[0] <= MAX_CHANNELS:
        arr = arr.T  # (channels, frames), as torch and librosa hold it
    if arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape[1] > MAX_CHANNELS):
        raise DataError(f"an audio array must be (frames,) or (frames, channels), not shape {arr.shape}")
    return arr


def _from_string(ref: str) -> tuple[np.ndarray, int]:
    scheme, sep, rest = ref.partition("://")
    if not sep or len(scheme) < 2:  # a plain path (a Windows drive letter is one character)
        return _read_path(ref)
    if scheme == "file":
        return _read_path(rest)
    if scheme == "tar":
        return _read_tar(rest)
    raise DataError(f"unknown audio reference scheme '{scheme}://' in {ref!r}: use a path, file:// or tar://")


_TAR_REF = re.compile(r"^(.+?\.tar)#(.+)$")


def _read_tar(rest: str) -> tuple[np.ndarray, int]:
    m = _TAR_REF.match(rest) or re.match(r"^(.+)#(.+)$", rest)
    if not m:
        raise DataError(f"bad tar reference 'tar://{rest}': expected tar://<shard.tar>#<member>")
    shard, member = m.groups()
    return _read_sound(io.BytesIO(read_member(shard, member)), f"{shard}#{member}")


def _read_path(path: str) -> tuple[np.ndarray, int]:
    if os.path.isdir(path):
        raise DataError(f"unreadable audio: {path} is a directory, not an audio file")
    if not os.path.exists(path):
        raise DataError(f"unreadable audio: file not found: {path}")
    return _read_sound(path, path)


def _read_stream(stream: Any) -> bytes:
    try:
        data = stream.read()
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable audio: the upload could not be read: {exc}") from exc
    if isinstance(data, str):
        raise DataError("unreadable audio: the upload is a text stream; open it in binary mode")
    return bytes(data)


def _read_sound(source: Any, name: str) -> tuple[np.ndarray, int]:
    """Decode with soundfile: every failure of the item is 'unreadable audio: <name>: <why>'."""
    try:
        import soundfile
    except ImportError as exc:
        raise MissingDependencyError("reading audio files", "soundfile", extra="audio") from exc
    except OSError as exc:  # the package is there, its libsndfile is not
        raise MissingDependencyError("reading audio files", "soundfile (libsndfile)", extra="audio") from exc
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except AnybindError:
        raise
    except MemoryError as exc:
        raise DataError(f"unreadable audio: {name}: out of memory decoding it") from exc
    except Exception as exc:  # noqa: BLE001 - libsndfile reports every bad stream as its own error
        raise DataError(f"unreadable audio: {name}: {_reason(exc)}") from exc
    return samples, int(rate)


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    # soundfile names the stream by its repr ('<_io.BytesIO object at 0x...>'): the name says it
    text = re.sub(r"^Error opening .*?: ", "", text.split("\n")[0])
    return text[:300]


__all__ = [
    "AUDIO_EXTENSIONS",
    "CLIPPED_SHARE",
    "SILENT_PEAK",
    "check_samples",
    "is_audio",
    "load_audio",
    "resample",
    "to_mono",
]
