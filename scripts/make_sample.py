"""Make the packaged sample radiograph from a registry package whose licence allows shipping it.

Source: the NEMA WG04 compression test image RG1 (CR chest PA, MONOCHROME1, 1955 x 1841), as
distributed in the PyPI package ``pydicom-data`` 1.0.0 (MIT licence), file
``data_store/data/RG1_UNCR.dcm`` (the uncompressed variant). It is read with cxr_edge's own DICOM
path (modality LUT, window, MONOCHROME1 inversion), resized so the long side is 1024 px (OpenCV
INTER_AREA) and written as an 8-bit grayscale PNG without metadata: no DICOM attribute is carried.

    pip download --no-deps pydicom-data==1.0.0 -d /tmp/pdd
    python scripts/make_sample.py /tmp/pdd/pydicom_data-1.0.0-py3-none-any.whl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np

from cxr_edge.imaging import read_image

MEMBER = "data_store/data/RG1_UNCR.dcm"
OUT_DIR = Path(__file__).resolve().parents[1] / "cxr_edge" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", help="path to pydicom_data-1.0.0-py3-none-any.whl")
    parser.add_argument("--long-side", type=int, default=1024)
    args = parser.parse_args()
    wheel_bytes = Path(args.wheel).read_bytes()
    with zipfile.ZipFile(args.wheel) as zf:
        dicom_bytes = zf.read(MEMBER)
    image = read_image(dicom_bytes)
    h, w = image.pixels.shape
    scale = args.long_side / max(h, w)
    small = cv2.resize(image.pixels, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    png = np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = OUT_DIR / "sample_chest_pa.png"
    cv2.imwrite(str(out), png)
    provenance = {
        "file": out.name,
        "source": "NEMA WG04 compression test set, image RG1 (CR chest PA)",
        "obtained_from": f"PyPI package pydicom-data 1.0.0 (MIT licence), member {MEMBER}",
        "wheel_sha256": hashlib.sha256(wheel_bytes).hexdigest(),
        "dicom_sha256": hashlib.sha256(dicom_bytes).hexdigest(),
        "processing": f"cxr_edge.read_image ({image.info.get('voi')} VOI, MONOCHROME1 inverted), "
                      f"{w}x{h} -> {png.shape[1]}x{png.shape[0]} INTER_AREA, 8-bit PNG, no metadata",
        "png_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    (OUT_DIR / "sample_chest_pa.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
    main()
