"""Writes sample studies: a MONAI Label studies folder of synthetic volumes and a brain MRI.

`python -m services.datastore.sample_studies FOLDER` fills an empty folder with small
NIfTI volumes of bright spheres on noise, a few of them with a "final" label, and (unless
`--no-brain`) the MNI152 T1 template at 2 mm (`mni152_t1`) with its brain mask as final
label, laid out exactly as MONAI Label lays out a studies folder. Nothing is downloaded:
the template ships inside the nilearn package. The datastore adopts such a folder as it is
on first start. A folder that already holds images is left alone, so the command is safe
to repeat.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {"sphere_a": 1, "sphere_b": 2}
BRAIN_ID = "mni152_t1"
BRAIN_LABELS = {"brain": 1}


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


def mni152_available() -> bool:
    """Whether the MNI152 template can be written (it ships inside the nilearn package)."""
    return importlib.util.find_spec("nilearn") is not None


def mni152_t1(resolution: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 T1 template (float32, 0-1) at `resolution` mm, its brain mask (uint8 0/1)
    and their affine; at 2 mm the grid is 99×117×95.

    nilearn's loaders read the 1 mm template packaged in nilearn/datasets/data and resample
    it; they never download (unlike nilearn's fetch_* functions).
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    template = load_mni152_template(resolution=resolution)
    mask = load_mni152_brain_mask(resolution=resolution)
    affine = np.asarray(template.affine, dtype=np.float64)
    if not np.allclose(mask.affine, affine) or mask.shape != template.shape:
        raise RuntimeError("nilearn's MNI152 brain mask is not on the template's grid")
    image = np.asarray(template.get_fdata(dtype=np.float32), dtype=np.float32)
    label = (np.asarray(mask.dataobj) > 0).astype(np.uint8)
    return image, label, affine


def write_sample_studies(
    root: Path, *, count: int = 6, labeled: int = 2, size: int = 64, seed: int = 0, brain: bool = False
) -> list[str]:
    """Writes `count` sphere images (the first `labeled` with a final label) and, with `brain`,
    the MNI152 T1 image `mni152_t1` with its brain mask as final label; returns the ids written."""
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
    if brain:
        image, label, brain_affine = mni152_t1()
        # The label first: an image never appears without its final label.
        nib.save(nib.Nifti1Image(label, brain_affine), root / "labels" / "final" / f"{BRAIN_ID}.nii.gz")
        nib.save(nib.Nifti1Image(image, brain_affine), root / f"{BRAIN_ID}.nii.gz")
        ids.append(BRAIN_ID)
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="studies folder to fill")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--labeled", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--brain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the MNI152 T1 (2 mm) with its brain mask as final label (needs nilearn)",
    )
    args = parser.parse_args(argv)
    brain = args.brain
    if brain and not mni152_available():
        print("sample studies: nilearn is not installed; writing no MNI152 brain study", file=sys.stderr)
        brain = False
    ids = write_sample_studies(args.root, count=args.count, labeled=args.labeled, size=args.size, brain=brain)
    if ids:
        extra = f" and the MNI152 T1 {BRAIN_ID} (labeled)" if BRAIN_ID in ids else ""
        print(f"sample studies: wrote {args.count} sphere images ({args.labeled} labeled){extra} to {args.root}")
    else:
        print(f"sample studies: {args.root} already holds images; left as it is")


if __name__ == "__main__":
    main()
