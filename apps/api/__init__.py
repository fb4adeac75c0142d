"""The app-plugin API: what an app (or a bundle adapter) builds on, and all a service needs of it.

- `apps.api.prompt`: `Prompt` and `Point`, the clicks of an interactive model (no torch);
- `apps.api.base`: `InferTask`, `InferInput`, `InferType`, an app's models;
- `apps.api.train`: `Trainer`, `TrainContext`, `ResampleToSpacingd`, an app's trainers;
- `apps.api.activelearning`: `Strategy`, `ScoringMethod` and their helpers;
- `apps.api.transforms`: pre- and post-steps tasks compose (resampling, click guidance, labels).

An app is a package beside this one (the sample `apps.radiology`, or your own) that imports
only from here; services load it by name (`--app`, LABELGRID_APP) and import only this API.
"""
