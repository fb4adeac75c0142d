"""Running the app's networks, shared by inference, active learning scoring and training.

Devices (`devices`), value types (`types`), the protocols the shared code needs (`ports`),
the torch runner (`torch_runner`), image / label files (`volumes`) and the cache of loaded
networks with the served-version lookup (`cache`). Inference and scoring load and run
networks through these same classes; training uses the device resolution.
"""
