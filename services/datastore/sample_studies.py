"""Writes sample studies: a MONAI Label studies folder of synthetic volumes.

`python -m services.datastore.sample_studies FOLDER` fills an empty folder with small
NIfTI volumes of bright spheres on noise (nothing is downloaded), a few of them with a
"final" label, laid out exactly as MONAI Label lays out a studies folder. The datastore
adopts such a folder as it is on first start. A folder that already holds images is left
alone, so the command is safe to repeat.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {"sphere_a": 1, "sphere_b": 2}


def synthetic_volume(rng: np.random.Generator, size: int = 64, spheres: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image of bright spheres and its label map (values from LABELS)."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1)
    image = rng.normal(0.0, 0.15, (size, size, size)).astype(np.float32)
    label = np.zeros((size, size, size), dtype=np.uint8)
    for index in range(spheres):
        radius = rng.uniform(size * 0.08, size * 0.18)
        centre = rng.uniform(radius, size - radius, 3)
        mask = np.linalg.norm(grid - centre, axis=-1) <= radius
        image[mask] += rng.uniform(0.6, 1.0)
        label[mask] = 1 + index % len(LABELS)
    return image, label


def write_sample_studies(root: Path, *, count: int = 6, labeled: int = 2, size: int = 64, seed: int = 0) -> list[str]:
    """Writes `count` images (the first `labeled` with a final label); returns their ids."""
    root.mkdir(parents=True, exist_ok=True)
    if any(root.glob("*.nii*")):
        return []
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm voxels, as the CPU-sized sample models use
    (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "original").mkdir(parents=True, exist_ok=True)
    ids = []
    for number in range(count):
        image_id = f"sample_{number:02d}"
        image, label = synthetic_volume(rng, size)
        nib.save(nib.Nifti1Image(image, affine), root / f"{image_id}.nii.gz")
        if number < labeled:
            nib.save(nib.Nifti1Image(label, affine), root / "labels" / "final" / f"{image_id}.nii.gz")
        ids.append(image_id)
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="studies folder to fill")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--labeled", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    ids = write_sample_studies(args.root, count=args.count, labeled=args.labeled, size=args.size)
    if ids:
        print(f"sample studies: wrote {len(ids)} images ({args.labeled} labeled) to {args.root}")
    else:
        print(f"sample studies: {args.root} already holds images; left as it is")


if __name__ == "__main__":
    main()
