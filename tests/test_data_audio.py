"""Audio: ESC-50 folds and WAV reading, with tiny WAV files written by the stdlib ``wave`` module."""

import wave

import numpy as np
import pytest

from lora_ensemble.app.data import load_dataset
from lora_ensemble.app.data._io import read_wav, resample

CATEGORIES = ["dog", "rooster", "pig"]


def write_wav(path, samples, rate, width=2, channels=1):
    """Write int PCM: ``samples`` float in [-1, 1], shape (T,) or (T, channels)."""
    samples = np.asarray(samples, dtype=np.float64).reshape(len(samples), channels)
    if width == 1:
        data = np.round(samples * 127 + 128).astype(np.uint8).tobytes()
    elif width == 2:
        data = np.round(samples * 32767).astype("<i2").tobytes()
    elif width == 3:
        ints = np.round(samples * (2**23 - 1)).astype("<i4").reshape(-1)
        data = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        data = np.round(samples * (2**31 - 1)).astype("<i4").tobytes()
    with wave.open(str(path), "wb") as file:
        file.setnchannels(channels)
        file.setsampwidth(width)
        file.setframerate(rate)
        file.writeframes(data)


def write_esc50(root, clips_per_fold=3, rate=8000, seconds=0.05):
    """ESC-50 layout: meta/esc50.csv + audio/<fold>-<id>-A-<target>.wav, 5 folds."""
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    t = np.arange(int(rate * seconds)) / rate
    for fold in range(1, 6):
        for i in range(clips_per_fold):
            target = i % len(CATEGORIES)
            name = f"{fold}-{100 + i}-A-{target}.wav"
            write_wav(root / "audio" / name, 0.5 * np.sin(2 * np.pi * 440 * t + fold), rate)
            rows.append(f"{name},{fold},{target},{CATEGORIES[target]},False,{100 + i},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")


def test_esc50_test_fold_is_test_and_the_rest_trains(tmp_path):
    write_esc50(tmp_path)
    splits = load_dataset("esc50", root=tmp_path, test_fold=2, sample_rate=8000)
    assert splits.modality == "audio" and splits.sample_rate == 8000
    assert splits.class_names == CATEGORIES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 0, 3)
    assert all(name.startswith("2-") for name in splits.test.ids)
    assert not any(name.startswith("2-") for name in splits.train.ids)
    waveform, label = splits.test[1]
    assert waveform.dtype == np.float32 and waveform.shape == (400,) and label == 1
    t = np.arange(400) / 8000  # the clip as written by write_esc50 for fold 2, read at its own rate
    np.testing.assert_allclose(waveform, 0.5 * np.sin(2 * np.pi * 440 * t + 2), atol=1e-4)


def test_esc50_val_fold_and_resampling_on_access(tmp_path):
    write_esc50(tmp_path)
    splits = load_dataset("esc50", root=tmp_path, test_fold=5, val_fold=4, sample_rate=16000)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 3)
    assert all(name.startswith("4-") for name in splits.val.ids)
    waveform, _ = splits.val[0]
    assert waveform.shape == (800,)  # 0.05 s at 16 kHz, resampled from 8 kHz
    native = load_dataset("esc50", root=tmp_path, sample_rate=None)
    assert native.sample_rate == 8000 and native.train[0][0].shape == (400,)


def test_esc50_errors_name_the_fold_file_and_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="esc50.csv.*audio"):
        load_dataset("esc50", root=tmp_path)
    write_esc50(tmp_path)
    with pytest.raises(ValueError, match=r"test_fold=6.*\[1, 2, 3, 4, 5\]"):
        load_dataset("esc50", root=tmp_path, test_fold=6)
    with pytest.raises(ValueError, match="val_fold=1 must be None or a fold other than test_fold=1"):
        load_dataset("esc50", root=tmp_path, test_fold=1, val_fold=1)
    (tmp_path / "audio" / "3-101-A-1.wav").unlink()
    with pytest.raises(FileNotFoundError, match="1 clip.*3-101-A-1.wav"):
        load_dataset("esc50", root=tmp_path)
    (tmp_path / "meta" / "esc50.csv").write_text("filename,fold,category\nx.wav,1,dog\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['target'\]"):
        load_dataset("esc50", root=tmp_path)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_sample_widths_read_to_the_same_waveform(tmp_path, width):
    signal = np.array([0.0, 0.5, -0.5, 0.25, -1.0, 0.99])
    write_wav(tmp_path / "x.wav", signal, 1000, width=width)
    waveform, rate = read_wav(tmp_path / "x.wav")
    assert rate == 1000 and waveform.dtype == np.float32
    assert np.allclose(waveform, signal, atol=1.5 / 127 if width == 1 else 1e-4)


def test_stereo_is_averaged_to_mono(tmp_path):
    write_wav(tmp_path / "s.wav", np.array([[0.5, -0.5], [0.2, 0.4]]), 1000, channels=2)
    waveform, _ = read_wav(tmp_path / "s.wav")
    assert np.allclose(waveform, [0.0, 0.3], atol=1e-4)


def test_a_file_that_is_not_a_wav_is_named(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not a riff file")
    with pytest.raises(ValueError, match="bad.wav.*PCM WAV"):
        read_wav(tmp_path / "bad.wav")


def test_resampling_keeps_a_low_tone_with_and_without_scipy(monkeypatch):
    t = np.arange(4410) / 44100
    tone = np.sin(2 * np.pi * 200 * t).astype(np.float32)
    expected = np.sin(2 * np.pi * 200 * np.arange(1600) / 16000)
    out = resample(tone, 44100, 16000)
    assert out.shape == (1600,) and np.abs(out[50:-50] - expected[50:-50]).max() < 0.02
    monkeypatch.setitem(__import__("sys").modules, "scipy.signal", None)  # pretend scipy is missing
    linear = resample(tone, 44100, 16000)
    assert linear.shape == (1600,) and np.abs(linear - expected).max() < 0.02
