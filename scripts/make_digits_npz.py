"""Write ``kit/data/digits.npz``, the digits the kit embeds, from scikit-learn's ``load_digits()``.

    python scripts/make_digits_npz.py [--out kit/data/digits.npz]

Run once, by a maintainer, with scikit-learn installed (the kit itself does not need it). The file holds ``images``
(1797, 8, 8) uint8 grey levels 0..16 and ``labels`` (1797,) uint8, exactly scikit-learn's values. The archive's
bytes depend on the zlib that compressed them, so what is checked is the arrays' content:
:func:`kit.data.digits.digits_sha256`, which must equal :data:`kit.data.digits.DIGITS_SHA256` (the script prints both
and fails if they differ). Members are written with a fixed timestamp, so the same zlib writes the same bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kit.data.digits import DIGITS_SHA256, digits_sha256  # noqa: E402


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 ``images`` (1797, 8, 8) and ``labels`` (1797,), checked to be exact."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images)
    target = np.asarray(d.target)
    out_images, out_labels = images.astype(np.uint8), target.astype(np.uint8)
    if not (np.array_equal(out_images, images) and np.array_equal(out_labels, target)):
        raise SystemExit("scikit-learn's digits are not integers in 0..255: refusing to write a lossy copy")
    return out_images, out_labels


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A ``.npz`` that ``np.load`` reads, deflated, each member stamped 1980-01-01 (no write time in the bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, a in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, member.getvalue(), compresslevel=9)
    path.write_bytes(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kit" / "data" / "digits.npz")
    args = parser.parse_args()
    images, labels = digits_arrays()
    write_npz(args.out, {"images": images, "labels": labels})
    with np.load(args.out, allow_pickle=False) as npz:
        got = digits_sha256(npz["images"], npz["labels"])
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), arrays sha256 {got}")
    if got != DIGITS_SHA256:
        raise SystemExit(f"the arrays' fingerprint differs from kit.data.digits.DIGITS_SHA256 ({DIGITS_SHA256}): "
                         "update the constant only if the data really changed")


if __name__ == "__main__":
    main()
