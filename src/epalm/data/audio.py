"""Audio: soundfile decoding, torch resampling, AST fbanks with SpecAugment, Whisper log-mels.

* Decoding uses ``soundfile`` (optional dependency, ``pip install soundfile``); channels are
  averaged to mono.
* Resampling is band-limited **windowed-sinc interpolation (Hann window), computed as a polyphase
  filter bank with one ``torch.nn.functional.conv1d``** -- the same algorithm as
  ``torchaudio.functional.resample``'s default (``sinc_interp_hann``, 6 zero crossings, rolloff
  0.99), written here because torchaudio is not installable. Both AST and Whisper expect 16 kHz.
* AST features follow the release: waveform minus its mean, Kaldi-style 128-bin log-mel fbank with
  a 10 ms shift (``transformers.ASTFeatureExtractor``, whose numpy path is used when torchaudio is
  absent), cut/zero-padded to 1024 frames, SpecAugment when training (frequency mask 24, time mask
  96, applied *before* normalisation as in the release), then ``(x - mean) / (2 * std)`` with the
  AudioSet statistics.
* Whisper features are ``transformers.WhisperFeatureExtractor``'s log-mels (80 or 128 bins x 3000
  frames for 30 s); SpecAugment is not applied to them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from epalm.errors import MediaError

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "load_audio",
    "resample",
    "spec_augment",
    "ASTFeatures",
    "WhisperFeatures",
    "AudioLoader",
]

AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


def load_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Decode an audio file to a mono float32 waveform (N,) and its sample rate."""
    try:
        import soundfile as sf
    except ImportError as e:  # pragma: no cover - exercised only without soundfile
        raise ImportError("reading audio needs soundfile: pip install 'soundfile>=0.12' (or epalm[audio])") from e
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as e:
        raise MediaError(path, f"unreadable audio ({type(e).__name__}: {e})") from e
    if data.shape[0] == 0:
        raise MediaError(path, "audio has no samples")
    if not np.isfinite(data).all():
        raise MediaError(path, "audio has non-finite samples")
    return torch.from_numpy(np.ascontiguousarray(data.mean(axis=1))), int(sr)


def _sinc_kernels(orig: int, new: int, width_zc: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase kernels (new, 1, taps): phase j holds the Hann-windowed sinc for output j/new."""
    cutoff = min(orig, new) * rolloff  # low-pass below the lower Nyquist, in units of the reduced rates
    width = math.ceil(width_zc * orig / cutoff)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * cutoff).clamp(-width_zc, width_zc)
    window = torch.cos(t * math.pi / width_zc / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return sinc * window * (cutoff / orig), width


def resample(
    waveform: torch.Tensor,
    orig_sr: int,
    new_sr: int,
    *,
    lowpass_zero_crossings: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Resample the last axis from ``orig_sr`` to ``new_sr`` (windowed-sinc polyphase, see module doc).

    The output has ``ceil(N * new_sr / orig_sr)`` samples; dtype is preserved.
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError("sample rates must be positive")
    if orig_sr == new_sr:
        return waveform
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    shape = waveform.shape
    n = shape[-1]
    x = waveform.reshape(-1, 1, n).to(torch.float64)
    kernels, width = _sinc_kernels(orig, new, lowpass_zero_crossings, rolloff)
    y = F.conv1d(F.pad(x, (width, width + orig)), kernels, stride=orig)  # (B, new, frames)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, : math.ceil(new * n / orig)]
    return y.reshape(*shape[:-1], -1).to(waveform.dtype)


def spec_augment(
    spec: torch.Tensor,
    freq_mask: int = 24,
    time_mask: int = 96,
    *,
    mask_value: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One frequency and one time mask on a (time, freq) spectrogram (torchaudio's rule).

    Width ``w = U[0, param)``, start ``U[0, size - w)``; rows/columns ``[start, start + w)`` are
    set to ``mask_value``. Returns a new tensor.
    """
    out = spec.clone()
    for axis, param in ((1, freq_mask), (0, time_mask)):
        if param <= 0:
            continue
        size = out.shape[axis]
        value = float(torch.rand((), generator=generator)) * min(param, size)
        start = float(torch.rand((), generator=generator)) * (size - value)
        a, b = int(start), int(start) + int(value)
        if axis == 1:
            out[:, a:b] = mask_value
        else:
            out[a:b, :] = mask_value
    return out


class ASTFeatures:
    """Waveform -> AST input (max_length, num_mel_bins), the release's recipe (see module doc)."""

    def __init__(
        self,
        num_mel_bins: int = 128,
        max_length: int = 1024,
        *,
        freq_mask: int = 24,
        time_mask: int = 96,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
        sampling_rate: int = 16000,
    ) -> None:
        from transformers import ASTFeatureExtractor

        with warnings.catch_warnings():  # 128 Kaldi bins on 257 FFT bins leave one empty filter, as in the original
            warnings.simplefilter("ignore", UserWarning)
            self.extractor = ASTFeatureExtractor(
                sampling_rate=sampling_rate, num_mel_bins=num_mel_bins, max_length=max_length, do_normalize=False
            )
        self.freq_mask, self.time_mask = freq_mask, time_mask
        self.mean, self.std, self.sampling_rate = mean, std, sampling_rate

    def __call__(
        self, waveform: torch.Tensor, sr: int, train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        wav = resample(waveform.float(), sr, self.sampling_rate)
        wav = wav - wav.mean()
        if wav.numel() < 400:  # one 25 ms analysis window; shorter clips are zero-padded
            wav = F.pad(wav, (0, 400 - wav.numel()))
        fbank = self.extractor(wav.numpy(), sampling_rate=self.sampling_rate, return_tensors="np")["input_values"][0]
        fbank = torch.from_numpy(np.asarray(fbank, dtype=np.float32))
        if train:
            fbank = spec_augment(fbank, self.freq_mask, self.time_mask, generator=generator)
        return (fbank - self.mean) / (self.std * 2)


class WhisperFeatures:
    """Waveform -> Whisper log-mel input (feature_size, 3000) via ``WhisperFeatureExtractor``.

    ``context_frames`` (even, < 3000): the clip is cut or zero-padded to ``context_frames * 10`` ms
    and only that many frames are returned, for a :class:`~epalm.core.encoders.WhisperClipEncoder`.
    """

    def __init__(self, feature_size: int = 80, sampling_rate: int = 16000, context_frames: int | None = None) -> None:
        from transformers import WhisperFeatureExtractor

        self.extractor = WhisperFeatureExtractor(feature_size=feature_size, sampling_rate=sampling_rate)
        self.sampling_rate = sampling_rate
        self.context_frames = context_frames

    def __call__(
        self, waveform: torch.Tensor, sr: int, train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        wav = resample(waveform.float(), sr, self.sampling_rate)
        if self.context_frames is None:
            feats = self.extractor(wav.numpy(), sampling_rate=self.sampling_rate, return_tensors="np")["input_features"][0]
            return torch.from_numpy(np.asarray(feats, dtype=np.float32))
        n = self.context_frames * self.extractor.hop_length
        feats = self.extractor(wav[:n].numpy(), sampling_rate=self.sampling_rate, return_tensors="np",
                               padding="max_length", max_length=n, truncation=True)["input_features"][0]
        return torch.from_numpy(np.asarray(feats, dtype=np.float32)[:, :self.context_frames])


class AudioLoader:
    """Media loader for audio: ``loader(path, train) -> features`` for an AST or Whisper encoder."""

    modality = "audio"

    def __init__(self, kind: Literal["ast", "whisper"] = "ast", *, augment: bool = True, **kwargs) -> None:
        if kind == "ast":
            self.features: ASTFeatures | WhisperFeatures = ASTFeatures(**kwargs)
        elif kind == "whisper":
            self.features = WhisperFeatures(**kwargs)
        else:
            raise ValueError(f"unknown audio feature kind {kind!r}; expected 'ast' or 'whisper'")
        self.kind, self.augment = kind, augment

    def __call__(self, path: str | Path, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        waveform, sr = load_audio(path)
        return self.features(waveform, sr, train=train and self.augment, generator=generator)
