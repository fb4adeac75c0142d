"""Apps: the models users label with, declared the way a MONAI Label app declares them.

An app is a plain Python package exposing `infer_tasks()` (and later trainers, strategies
and scoring methods). Every service loads the same app (`LABELGRID_APP`, default
`apps.radiology`) and uses only its part. `apps.base` holds the task base classes.
"""
