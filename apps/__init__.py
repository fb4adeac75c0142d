"""Apps: the models users label with, declared the way a MONAI Label app declares them.

`apps.api` is the plugin API (infer tasks, trainers, strategies, scoring methods); an app is
a plain Python package built on it that exposes `infer_tasks()` and, optionally, `trainers()`,
`strategies()` and `scoring_methods()`. Every service loads the same app (`LABELGRID_APP`,
default `apps.radiology`, the sample app) and uses only its part; `apps.bundle` serves MONAI
Bundles through the same API.
"""
