"""Runs the app's tasks with torch: builds networks, loads weights, warm-up, inference.

Shared by inference and active learning scoring (which loads networks through it).
Everything here blocks; callers run it on the device's thread pool (inference's scheduler,
the scorer's worker thread). A weights
file is a state_dict, or a MONAI Label / ignite checkpoint holding one under "model";
loaded with `weights_only=True`, so a weights file can never run code.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from apps.api.base import InferInput, InferTask, Prompt
from services.common.errors import FailedPrecondition, LabelgridError
from services.common.models.batching import Batcher, BatchPolicies
from services.common.models.devices import describe_devices
from services.common.models.types import (
    Cancelled,
    DeviceInfo,
    LoadedNetwork,
    RunResult,
    Volume,
)


class InferenceError(LabelgridError):
    reason = "INFERENCE_ERROR"


def _state_dict(weights: Path) -> dict[str, Any]:
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise TypeError("the weights file holds no state_dict")
    return state


def _check(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise Cancelled("the inference was cancelled by its caller")


class TorchRunner:
    """`ModelRunner` with torch on the devices it was given."""

    def __init__(self, device_names: list[str], warm_up: bool = True, batching: BatchPolicies | None = None):
        self.device_names = list(device_names)
        self.warm_up = warm_up
        # Dynamic batching of concurrent requests' patches (services.common.models.batching);
        # None: every request runs its own forward passes.
        self.batching = batching
        self.batcher = Batcher()

    def devices(self) -> list[DeviceInfo]:
        return describe_devices(self.device_names)

    def load(self, task: InferTask, device: str, weights: Path | None, version: str) -> LoadedNetwork:
        started = time.perf_counter()
        try:
            network = task.initial_network()
            if weights is not None:
                network.load_state_dict(_state_dict(weights))
        except Exception as error:
            raise FailedPrecondition(
                f"cannot load version {version!r} of {type(task).__name__}: {error}", reason="MODEL_IMPORT_ERROR"
            ) from error
        network = network.to(torch.device(device)).eval()
        if self.warm_up:
            # One forward pass at load: allocator, cuDNN autotune and lazy init happen now, not in a user's request.
            with torch.inference_mode():
                shape = (1, task.input_channels, *task.roi_size)
                network(torch.zeros(shape, device=device))
        size = sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])
        return LoadedNetwork(network, device, version, int(size), time.perf_counter() - started)

    def run(
        self,
        task: InferTask,
        loaded: LoadedNetwork,
        volume: Volume,
        prompt: Prompt,
        params: dict[str, Any],
        cancelled: threading.Event,
        input_label: Any = None,
        model: str = "",
    ) -> RunResult:
        latencies: dict[str, float] = {}
        device = torch.device(loaded.device)
        try:
            if task.reads_files:
                if volume.path is None:
                    raise InferenceError(f"{type(task).__name__} reads image files, and this image has none")
                label = torch.from_numpy(
                    np.asarray(
                        task.infer_file(
                            loaded.network, volume.path, loaded.device, lambda: _check(cancelled), latencies, prompt
                        )
                    )
                )
                return self._restore(task, label, volume, prompt, latencies)
            started = time.perf_counter()
            data = {"image": torch.from_numpy(np.asarray(volume.data, dtype=np.float32))[None], "affine": volume.affine}
            if input_label is not None:  # e.g. scribbles: on the image's grid, channel first as the image
                data["label"] = torch.from_numpy(np.asarray(input_label, dtype=np.float32))[None]
            item = InferInput(data, prompt, dict(params))
            for step in task.pre_transforms(params):
                item = step(item)
            latencies["pre"] = time.perf_counter() - started
            _check(cancelled)

            started = time.perf_counter()
            inputs = item.data["image"][None].to(device)
            policy = self.batching.policy(model, loaded.device) if self.batching is not None else None
            with torch.inference_mode():
                if policy is not None and policy.enabled:
                    with self.batcher.predictor(loaded.network, policy, cancelled) as predictor:
                        logits = task.inferer(params)(inputs, predictor)
                else:
                    logits = task.inferer(params)(inputs, loaded.network)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            latencies["infer"] = time.perf_counter() - started
            _check(cancelled)

            started = time.perf_counter()
            label = logits.detach()
            for post_step in task.post_transforms(params):
                label = post_step(label)
            latencies["post"] = time.perf_counter() - started

            return self._restore(task, label, volume, prompt, latencies)
        except LabelgridError:
            raise
        except Exception as error:
            raise InferenceError(f"running {type(task).__name__} failed: {error}") from error

    @staticmethod
    def _restore(
        task: InferTask, label: torch.Tensor, volume: Volume, prompt: Prompt, latencies: dict[str, float]
    ) -> RunResult:
        """Back onto the image's grid (MONAI Label's Restored): nearest, so labels stay labels."""
        started = time.perf_counter()
        if tuple(label.shape) != volume.shape:
            label = F.interpolate(label[None, None].float(), size=volume.shape, mode="nearest")[0, 0]
        restored = label.to(torch.int64).cpu().numpy()
        restored = task.finalize(restored, prompt)
        latencies["invert"] = time.perf_counter() - started
        return RunResult(restored, latencies)
