"""Sample radiology app: small 3D models for the synthetic sphere studies.

Models start untrained (seeded, so replicas agree) and learn from the bundled sample
studies (`python -m services.datastore.sample_studies`): labels sphere_a=1, sphere_b=2;
`segmentation_brain` segments the brain (brain=1) of the MNI152 T1 sample study.
CPU-sized: 2 mm voxels, 64³ patches (96³ for the brain), a few channels.
"""

from __future__ import annotations

from apps.api.activelearning import ScoringMethod, Strategy
from apps.api.base import InferTask
from apps.api.train import Trainer
from apps.radiology.deepedit import DeepEdit
from apps.radiology.deepgrow import Deepgrow
from apps.radiology.scribbles import HistogramGraphCut
from apps.radiology.segmentation import Segmentation
from apps.radiology.segmentation_brain import SegmentationBrain

NAME = "radiology"
DESCRIPTION = (
    "Sample radiology app: segmentation, deepgrow and deepedit of synthetic spheres; brain segmentation of T1 MRI; "
    "scribbles (histogram + graph cut)"
)
VERSION = "0.1.0"
# The spheres' labels of the segmentation and deepedit models. Not the app-level LABELS hook: without
# one, /info/ lists the union of the models' labels as MONAI Label does (a list, which OHIF needs).
SPHERE_LABELS = {"sphere_a": 1, "sphere_b": 2}


def infer_tasks() -> dict[str, InferTask]:
    """The models this app serves, by name (MONAI Label's `models` in /info)."""
    return {
        "segmentation": Segmentation(SPHERE_LABELS),
        "deepgrow": Deepgrow(),
        "deepedit": DeepEdit(SPHERE_LABELS),
        "segmentation_brain": SegmentationBrain(),
        "scribbles": HistogramGraphCut(),
    }


def trainers() -> dict[str, Trainer]:
    """A trainer per model, named after it (MONAI Label's `trainers` in /info)."""
    from apps.radiology.trainers import radiology_trainers

    return radiology_trainers(infer_tasks())


def strategies() -> dict[str, Strategy]:
    """Active learning strategies (MONAI Label's `strategies` in /info)."""
    from apps.radiology.activelearning import strategies as radiology_strategies

    return radiology_strategies()


def scoring_methods() -> dict[str, ScoringMethod]:
    """Scoring methods for score-based strategies (MONAI Label's `scoring` in /info)."""
    from apps.radiology.activelearning import scoring_methods as radiology_scoring_methods

    return radiology_scoring_methods()
