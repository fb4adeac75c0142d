"""MONAI Bundles as app models: a bundle folder or zip becomes an infer task (and a trainer).

A bundle in the Model Zoo layout (`configs/metadata.json`, `configs/inference.json|yaml`,
optional `configs/train.json|yaml`, `models/model.pt` or `models/model.ts`) is built entirely
by MONAI's own `monai.bundle.ConfigParser`, the way MONAI Label's BundleInferTask does it:
`bundle_root` and `device` are overridden, the network is `network_def` with `model.pt`
loaded into it (or the TorchScript `model.ts`), and the bundle's own `preprocessing`,
`inferer` and `postprocessing` run on the image file (its LoadImaged ... Invertd), without
its SaveImaged. Labels are metadata.json's `network_data_format.outputs.pred.channel_def`
without background.

The infer type comes from the bundle as MONAI Label decides it (metadata.json `labelgrid_type`,
else the bundle's name: "deepedit", "deepgrow", ...). Segmentation, deepedit and deepgrow bundles
are served. An interactive bundle gets the request's clicks as MONAI Label's BundleInferTask
gives them, in the data dict its transforms read: each label's clicks under the label's name
(DeepEdit's AddGuidanceFromPointsDeepEditd with `label_names`), `foreground` / `background` /
`label` (Deepgrow's AddGuidanceFromPointsd), plus `label_names`; `use_click` is set in its config
for a deepedit bundle, as MONAI Label sets it. A deepedit bundle's labels keep background, as
MONAI Label lists them.

A bundle is code: its configs evaluate Python expressions and name any class. Only an admin
adds one. Zips are extracted defensively all the same (no absolute or `..` entries, no links,
bounded entry count and size), so a mistaken upload cannot write outside its folder or fill
the disk.

What a bundle cannot express raises `BundleError`, whose message names the key or file.
`python -m apps.bundle check BUNDLE.zip` builds a bundle and runs its network once, printing
its description as JSON (used to validate an upload in a child process).
"""

from __future__ import annotations

import json
import re
import stat
import sys
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from apps.api.base import InferInput, InferTask, InferType
from apps.api.prompt import Prompt

__all__ = ["Bundle", "BundleError", "BundleInferTask", "bundle_name", "load_bundle", "open_bundle"]

INFERENCE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
TRAIN_CONFIGS = ("train.json", "train.yaml", "train.yml")
# Laid over the train config when training runs on more than one device (MONAI Label's BundleTrainTask).
MULTI_GPU_CONFIGS = ("multi_gpu_train.json", "multi_gpu_train.yaml", "multi_gpu_train.yml")
# Zip limits: a bundle is configs + weights (+ docs, scripts); these are far above any Model Zoo bundle.
MAX_ZIP_ENTRIES = 10_000
MAX_UNPACKED_BYTES = 8 * 1024**3
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
_SUPPORTED_TYPES = (
    InferType.SEGMENTATION,
    InferType.ANNOTATION,
    InferType.OTHERS,
    InferType.DEEPEDIT,
    InferType.DEEPGROW,
)
_INTERACTIVE = (InferType.DEEPEDIT, InferType.DEEPGROW)
# Why the other types are refused: the key or input a bundle of that type needs that labelgrid lacks.
_UNSUPPORTED_WHY = {
    InferType.VISTA3D: "its prompts (points, point_labels, label_prompt) and VISTA3D's own inferer are not supported",
    InferType.DETECTION: "its 'detector' / 'detector_ops' keys (box outputs) are not supported",
    InferType.CLASSIFICATION: "class outputs (no label map) are not supported",
}
# A train config key labelgrid's trainer does not run: DeepEdit / Deepgrow click simulation.
_UNTRAINABLE_KEYS = ("train#trainer#iteration_update", "validate#evaluator#iteration_update")
# ConfigParser resolves a bundle's `scripts.*` by import from its root: one bundle on sys.path at a time.
_IMPORT_LOCK = threading.RLock()


class BundleError(ValueError):
    """A bundle that cannot be served; the message names the file or config key at fault."""


def bundle_name(path: Path) -> str:
    """The model name of a bundle, as MONAI Label names it: the folder name, or the zip's name without `.zip`."""
    name = path.name[:-4] if path.name.lower().endswith(".zip") else path.name
    if not _NAME_RE.match(name) or ".." in name or len(name) > 200:
        raise BundleError(f"bundle name {name!r} may contain only letters, digits, '.', '_' and '-'")
    return name


# -- zips -------------------------------------------------------------------------------------


def _safe_member(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The entry's relative path, or BundleError if it could land outside the folder; None for folders."""
    raw = info.filename
    if "\x00" in raw or "\\" in raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise BundleError(f"zip entry {raw!r} is not a relative path inside the bundle")
    path = PurePosixPath(raw)
    if any(part == ".." for part in path.parts):
        raise BundleError(f"zip entry {raw!r} points outside the bundle ('..')")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BundleError(f"zip entry {raw!r} is a symbolic link; bundles may hold only files and folders")
    if info.is_dir():
        return None
    return path


def extract_zip(
    zip_path: Path, dest: Path, max_bytes: int = MAX_UNPACKED_BYTES, max_entries: int = MAX_ZIP_ENTRIES
) -> None:
    """Extracts a bundle zip into `dest` (which must be empty), refusing unsafe or oversized zips.

    Sizes are counted while copying, not trusted from the zip's headers.
    """
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise BundleError(f"not a zip file: {error}") from None
    with archive:
        members = archive.infolist()
        if len(members) > max_entries:
            raise BundleError(f"the zip holds {len(members)} entries; a bundle may hold at most {max_entries}")
        checked = [(info, _safe_member(info)) for info in members]  # all entries checked before any is written
        seen: set[str] = set()
        written = 0
        for info, relative in checked:
            if relative is None:
                continue
            key = str(relative)
            if key in seen:
                raise BundleError(f"zip entry {key!r} appears twice")
            seen.add(key)
            target = dest.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as source, open(target, "wb") as out:
                    while block := source.read(1024 * 1024):
                        written += len(block)
                        if written > max_bytes:
                            raise BundleError(f"the zip unpacks to more than {max_bytes} bytes")
                        out.write(block)
            except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as error:
                raise BundleError(f"zip entry {key!r} cannot be read: {error}") from None


def _find_root(folder: Path) -> Path:
    """The bundle root inside an extracted zip: the folder itself, or its one top-level folder."""
    if (folder / "configs" / "metadata.json").is_file():
        return folder
    children = [child for child in folder.iterdir() if not child.name.startswith((".", "__MACOSX"))]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "configs" / "metadata.json").is_file():
        return children[0]
    raise BundleError("missing configs/metadata.json (a bundle holds configs/metadata.json and configs/inference.json)")


def open_bundle(path: Path, extract_dir: Path) -> Path:
    """The bundle root of a folder or a zip (extracted into the empty `extract_dir`)."""
    path = Path(path)
    if path.is_dir():
        return _find_root(path)
    if not path.is_file():
        raise BundleError(f"bundle {str(path)!r} does not exist")
    extract_dir.mkdir(parents=True, exist_ok=True)
    extract_zip(path, extract_dir)
    return _find_root(extract_dir)


def zip_bundle(root: Path, dest: Path) -> Path:
    """Zips a bundle folder (its files under the bundle's name, Model Zoo style)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(root.rglob("*")):
            if file.is_file() and not file.is_symlink() and "__pycache__" not in file.parts:
                archive.write(file, str(PurePosixPath(root.name, *file.relative_to(root).parts)))
    return dest


# -- the bundle --------------------------------------------------------------------------------


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _infer_type(name: str, metadata: Mapping[str, Any]) -> InferType:
    """metadata.json's `labelgrid_type` / `task` if it names an infer type, else MONAI Label's rule on the name."""
    for key in ("labelgrid_type", "infer_type"):
        declared = metadata.get(key)
        if declared:
            try:
                return InferType(str(declared).lower())
            except ValueError:
                raise BundleError(
                    f"metadata.json {key} {declared!r} is not an infer type ({', '.join(t.value for t in InferType)})"
                ) from None
    lower = name.lower()
    for word, kind in (
        ("deepedit", InferType.DEEPEDIT),
        ("deepgrow", InferType.DEEPGROW),
        ("detection", InferType.DETECTION),
        ("vista", InferType.VISTA3D),
        ("classification", InferType.CLASSIFICATION),
    ):
        if word in lower:
            return kind
    return InferType.SEGMENTATION


@dataclass
class Bundle:
    """A bundle folder, read and checked (nothing built yet)."""

    name: str
    root: Path
    metadata: dict[str, Any]
    inference_config: Path
    train_config: Path | None
    weights: Path
    torchscript: bool
    image_key: str
    pred_key: str
    labels: dict[str, int]
    channels: int
    input_channels: int
    type: InferType
    dimension: int
    description: str
    version: str
    extra: dict[str, Any] = field(default_factory=dict)
    multi_gpu_config: Path | None = None

    def parser(self, config: Path | None = None, device: str = "cpu", over: Sequence[Path] = ()) -> Any:
        """A ConfigParser of the config (default: inference) with MONAI Label's overrides; the
        configs in `over` are laid over it, later keys winning (MONAI's list of config files)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        path = config or self.inference_config
        try:
            parser.read_config([str(path), *(str(extra) for extra in over)] if over else str(path))
            parser.read_meta(str(self.root / "configs" / "metadata.json"))
        except Exception as error:  # noqa: BLE001 - a broken file is the bundle's fault
            names = ", ".join(f"configs/{p.name}" for p in (path, *over))
            raise BundleError(f"{names} cannot be read: {error}") from None
        overrides: dict[str, Any] = parser.config  # type: ignore[assignment]  # the root of a ConfigParser is a dict
        overrides.update({"bundle_root": str(self.root), "device": f"$torch.device({device!r})"})
        if path == self.inference_config:
            # MONAI Label's BundleInferTask: a deepedit bundle's inferer uses the clicks.
            overrides["use_click"] = self.type == InferType.DEEPEDIT
        return parser

    @property
    def trainable(self) -> bool:
        """A train config and a state dict to train (a TorchScript network is not trained here)."""
        return self.train_config is not None and not self.torchscript and not self.untrainable

    @property
    def untrainable(self) -> str:
        """Why its train config is not run here (a key labelgrid's trainer lacks); "" if it is."""
        return str(self.extra.get("untrainable", ""))

    @property
    def why_not_trainable(self) -> str:
        """Why `POST /train/{name}` cannot train this bundle, naming the file or key; "" if it can."""
        if self.train_config is None:
            return "the bundle has no configs/train.json (or train.yaml)"
        if self.torchscript:
            return "its weights are models/model.ts (TorchScript): served as they are, never trained"
        return self.untrainable

    def describe(self) -> dict[str, Any]:
        """What /info shows of the bundle."""
        return {
            "name": self.name,
            "version": self.version,
            "type": self.type.value,
            "labels": dict(self.labels),
            "description": self.description,
            "torchscript": self.torchscript,
            "trainable": self.trainable,
            **({"untrainable": self.untrainable} if self.untrainable else {}),
        }


def load_bundle(root: Path, name: str | None = None) -> Bundle:
    """Reads and checks a bundle folder: configs, weights, metadata and labels."""
    root = Path(root).resolve()
    name = name or bundle_name(root)
    configs = root / "configs"
    meta_path = configs / "metadata.json"
    if not meta_path.is_file():
        raise BundleError("missing configs/metadata.json")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"configs/metadata.json is not valid JSON: {error}") from None
    if not isinstance(metadata, dict):
        raise BundleError("configs/metadata.json must hold a JSON object")
    inference = _first_existing(configs, INFERENCE_CONFIGS)
    if inference is None:
        raise BundleError(f"missing configs/inference.json (or {', '.join(INFERENCE_CONFIGS[1:])})")
    train = _first_existing(configs, TRAIN_CONFIGS)
    multi_gpu = _first_existing(configs, MULTI_GPU_CONFIGS) if train is not None else None
    weights = root / "models" / "model.pt"
    torchscript = False
    if not weights.is_file():
        weights = root / "models" / "model.ts"
        torchscript = True
        if not weights.is_file():
            raise BundleError("missing models/model.pt (state dict) or models/model.ts (TorchScript)")

    data_format = metadata.get("network_data_format")
    if not isinstance(data_format, dict):
        raise BundleError("configs/metadata.json has no network_data_format")
    inputs, outputs = data_format.get("inputs"), data_format.get("outputs")
    if not isinstance(inputs, dict) or not inputs or not isinstance(outputs, dict) or not outputs:
        raise BundleError("configs/metadata.json network_data_format needs inputs and outputs")
    image_key, image = next(iter(inputs.items()))
    pred_key, pred = next(iter(outputs.items()))
    if not isinstance(image, dict) or not isinstance(pred, dict):
        raise BundleError("configs/metadata.json network_data_format inputs / outputs entries must be objects")
    channel_def = pred.get("channel_def")
    if not isinstance(channel_def, dict) or not channel_def:
        raise BundleError(
            f"configs/metadata.json network_data_format.outputs.{pred_key}.channel_def is missing or empty"
        )
    try:
        channels = {int(index): str(label) for index, label in channel_def.items()}
    except (TypeError, ValueError):
        raise BundleError(f"network_data_format.outputs.{pred_key}.channel_def keys must be channel numbers") from None
    infer_type = _infer_type(name, metadata)
    if infer_type not in _SUPPORTED_TYPES:
        why = _UNSUPPORTED_WHY.get(infer_type, "labelgrid serves segmentation, deepedit and deepgrow bundles")
        raise BundleError(
            f"bundle {name!r} is a {infer_type.value} bundle (metadata.json labelgrid_type, else its name): {why}; "
            "set metadata.json labelgrid_type to 'segmentation' if it is one"
        )
    # MONAI Label lists a deepedit bundle's labels with background (its clicks have a "background" group).
    keep_background = infer_type == InferType.DEEPEDIT
    labels = {
        label.lower(): index
        for index, label in sorted(channels.items())
        if keep_background or label.lower() != "background"
    }
    num_channels = pred.get("num_channels", len(channels))
    if not isinstance(num_channels, int) or num_channels != len(channels):
        raise BundleError(
            f"network_data_format.outputs.{pred_key}: num_channels {num_channels!r} but channel_def names {len(channels)} channels"
        )
    spatial = image.get("spatial_shape")
    dimension = len(spatial) if isinstance(spatial, (list, tuple)) and spatial else 3
    input_channels = image.get("num_channels", 1)
    return Bundle(
        name=name,
        root=root,
        metadata=metadata,
        inference_config=inference,
        train_config=train,
        weights=weights,
        torchscript=torchscript,
        image_key=str(image_key),
        pred_key=str(pred_key),
        labels=labels,
        channels=len(channels),
        input_channels=int(input_channels) if isinstance(input_channels, int) else 1,
        type=infer_type,
        dimension=dimension,
        description=str(metadata.get("description") or metadata.get("name") or name),
        version=str(metadata.get("version", "")),
        extra={"untrainable": _untrainable(train)} if train is not None else {},
        multi_gpu_config=multi_gpu,
    )


def _untrainable(train: Path) -> str:
    """The train config's key labelgrid's trainer does not run (DeepEdit's click simulation), as a reason."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(train))
    except Exception as error:  # noqa: BLE001 - a broken file is the bundle's fault
        raise BundleError(f"configs/{train.name} cannot be read: {error}") from None
    for key in _UNTRAINABLE_KEYS:
        if key in parser:
            return f"configs/{train.name} {key!r} (click simulation while training) is not run by labelgrid's trainer"
    return ""


class _OnBundlePath:
    """Puts the bundle root on sys.path while its config is parsed (its `scripts` package)."""

    def __init__(self, root: Path):
        self.root = str(root)

    def __enter__(self) -> None:
        _IMPORT_LOCK.acquire()
        sys.path.insert(0, self.root)
        for module in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[module]

    def __exit__(self, *exc: Any) -> None:
        try:
            sys.path.remove(self.root)
        finally:
            _IMPORT_LOCK.release()


def parsed(parser: Any, key: str, root: Path, what: str, required: bool = True) -> Any:
    """`parser.get_parsed_content(key)`, with a BundleError naming the key if it is missing or broken."""
    if key not in parser:
        if required:
            raise BundleError(f"{what} has no {key!r}")
        return None
    try:
        with _OnBundlePath(root):
            return parser.get_parsed_content(key, instantiate=True)
    except BundleError:
        raise
    except Exception as error:  # noqa: BLE001 - anything the bundle's config raises is the bundle's fault
        raise BundleError(f"{what} {key!r} cannot be built: {type(error).__name__}: {error}") from None


def _transforms(value: Any) -> list[Any]:
    from monai.transforms import Compose

    if value is None:
        return []
    if isinstance(value, Compose):
        return list(value.transforms)
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _without_savers(transforms: Sequence[Any]) -> list[Any]:
    from monai.transforms import SaveImage, SaveImaged

    return [t for t in transforms if not isinstance(t, (SaveImaged, SaveImage))]


@dataclass
class _Pipeline:
    pre: Any
    inferer: Any
    post: Any


class BundleInferTask(InferTask):
    """An infer task built by monai.bundle from a bundle's inference config.

    The runner hands it the image *file* (`reads_files`): the bundle's own LoadImaged,
    preprocessing, inferer and postprocessing (with its Invertd) produce the label on the
    image's grid, exactly as `monai.bundle.run` of the bundle would.
    """

    reads_files = True

    def __init__(self, bundle: Bundle):
        super().__init__()
        self.bundle = bundle
        self.type = bundle.type
        self.labels = dict(bundle.labels)
        self.dimension = bundle.dimension
        self.description = bundle.description
        self.input_channels = bundle.input_channels
        self.config = {"bundle_version": bundle.version, "torchscript": bundle.torchscript}
        self._pipelines: dict[str, _Pipeline] = {}
        self._lock = threading.Lock()
        inferer = self.pipeline("cpu").inferer
        roi = getattr(inferer, "roi_size", None)
        self.roi_size = tuple(int(v) for v in roi) if roi else (32,) * self.dimension

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["bundle"] = self.bundle.describe()
        return out

    # -- built by monai.bundle ------------------------------------------------------------

    def pipeline(self, device: str) -> _Pipeline:
        """The bundle's preprocessing, inferer and postprocessing for `device` (built once per device)."""
        with self._lock:
            found = self._pipelines.get(device)
            if found is None:
                what = f"configs/{self.bundle.inference_config.name}"
                parser = self.bundle.parser(device=device)
                from monai.transforms import Compose

                pre = next((k for k in ("preprocessing", "pre_transforms") if k in parser.config), "preprocessing")
                post = next((k for k in ("postprocessing", "post_transforms") if k in parser.config), "postprocessing")
                found = _Pipeline(
                    pre=Compose(_transforms(parsed(parser, pre, self.bundle.root, what))),
                    inferer=parsed(parser, "inferer", self.bundle.root, what),
                    post=Compose(
                        _without_savers(_transforms(parsed(parser, post, self.bundle.root, what, required=False)))
                    ),
                )
                self._pipelines[device] = found
            return found

    def network(self) -> torch.nn.Module:
        """`network_def` from the inference config (untrained until weights are loaded into it)."""
        parser = self.bundle.parser()
        what = f"configs/{self.bundle.inference_config.name}"
        key = "network_def" if "network_def" in parser.config else "network"
        network = parsed(parser, key, self.bundle.root, what)
        if not isinstance(network, torch.nn.Module):
            raise BundleError(f"{what} {key!r} is a {type(network).__name__}, not a torch.nn.Module")
        return network

    def initial_network(self) -> torch.nn.Module:
        """The bundle's own network: model.ts as it is, or network_def with model.pt loaded."""
        if self.bundle.torchscript:
            try:
                return torch.jit.load(str(self.bundle.weights), map_location="cpu")
            except Exception as error:  # noqa: BLE001
                raise BundleError(f"models/model.ts is not a TorchScript model: {error}") from None
        network = self.network()
        try:
            state = torch.load(str(self.bundle.weights), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
            network.load_state_dict(state)
        except Exception as error:  # noqa: BLE001
            raise BundleError(f"models/model.pt does not load into network_def: {error}") from None
        return network

    # -- the template, for active learning scoring (an image already loaded, no file) ----------

    def pre_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[InferInput], InferInput]]:
        """The bundle's preprocessing on the loaded volume (a MetaTensor with its affine stands in
        for what its LoadImaged + EnsureChannelFirstd give), so scoring sees the network's input."""
        return [self._preprocess]

    def _preprocess(self, item: InferInput) -> InferInput:
        from monai.data import MetaTensor
        from monai.transforms import Compose, EnsureChannelFirst, EnsureChannelFirstd, LoadImage, LoadImaged

        loaders = (LoadImage, LoadImaged, EnsureChannelFirst, EnsureChannelFirstd)
        steps = Compose([t for t in self.pipeline("cpu").pre.transforms if not isinstance(t, loaders)])
        affine = torch.as_tensor(np.asarray(item.data["affine"]), dtype=torch.float64)
        # The meta LoadImaged gives (DeepEdit's guidance transform reads spatial_shape).
        meta = {
            "original_channel_dim": 0,
            "original_affine": affine.clone(),
            "spatial_shape": np.asarray(item.data["image"].shape[1:]),
        }
        image = MetaTensor(item.data["image"], affine=affine, meta=meta)
        # An interactive bundle's transforms read the clicks (none when scoring: empty guidance).
        data = steps({**self.click_data(item.prompt), self.bundle.image_key: image})
        item.data["image"] = data[self.bundle.image_key]
        return item

    def inferer(self, params: Mapping[str, Any]) -> Any:
        return self.pipeline("cpu").inferer

    def post_transforms(self, params: Mapping[str, Any]) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        """The bundle's postprocessing (Invertd back to the image's grid ...) on the logits of `_preprocess`'s input."""
        return [self._postprocess]

    def _postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        pred = logits[0]
        # Invertd reads the transforms applied to the image from its orig_keys entry: the logits carry the same.
        data = self.pipeline("cpu").post({self.bundle.image_key: pred, self.bundle.pred_key: pred})
        return self._as_label(data[self.bundle.pred_key])

    def _as_label(self, label: Any) -> torch.Tensor:
        label = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        label = label.detach().cpu()
        if label.ndim == self.dimension + 1:
            if label.shape[0] != 1:
                # postprocessing left channels (no AsDiscreted argmax): take the argmax, a label holds one value per voxel
                label = label.argmax(dim=0, keepdim=True)
            label = label[0]
        return label.round().to(torch.int64)

    # -- running --------------------------------------------------------------------------------

    def click_data(self, prompt: Prompt | None) -> dict[str, Any]:
        """The request's clicks as MONAI Label puts them in the data dict of an interactive bundle's
        transforms: `{label name: [[i, j, k], ...]}` for every label (DeepEdit; "background" too),
        `foreground` / `background` / `label` (Deepgrow), and `label_names`. {} for other types."""
        if self.type not in _INTERACTIVE or prompt is None:
            return {}
        data: dict[str, Any] = {name: [list(p) for p in points] for name, points in prompt.label_points.items()}
        background = [*prompt.background, *prompt.label_points.get("background", ())]
        data["background"] = [list(p) for p in background]
        data["foreground"] = [list(p) for p in prompt.foreground]
        if prompt.label:
            data["label"] = prompt.label
        data["label_names"] = dict(self.labels)
        return data

    def infer_file(
        self,
        network: torch.nn.Module,
        path: Path,
        device: str,
        check: Callable[[], None],
        latencies: dict[str, float],
        prompt: Prompt | None = None,
    ) -> np.ndarray:
        """The label of the image file at `path` on its own grid (spatial dims, ints); an
        interactive bundle's transforms also get the prompt's clicks (`click_data`)."""
        import time

        pipeline = self.pipeline(device)
        started = time.perf_counter()
        data = pipeline.pre({**self.click_data(prompt), self.bundle.image_key: str(path)})
        latencies["pre"] = time.perf_counter() - started
        check()
        started = time.perf_counter()
        image = data[self.bundle.image_key]
        with torch.no_grad():  # as MONAI's SupervisedEvaluator runs a bundle's inferer
            pred = pipeline.inferer(image[None].to(torch.device(device)), network)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        latencies["infer"] = time.perf_counter() - started
        check()
        started = time.perf_counter()
        data[self.bundle.pred_key] = pred[0]
        data = pipeline.post(data)
        label = self._as_label(data[self.bundle.pred_key])
        latencies["post"] = time.perf_counter() - started
        return label.numpy()


def bundle_trainer(task: BundleInferTask) -> Any:
    """The trainer of a bundle with a train config (its train.json run by the training service)."""
    from apps.bundle_train import BundleTrainer

    return BundleTrainer(task)


# -- checking a bundle (an upload) -------------------------------------------------------------


def check_bundle(bundle: Bundle) -> dict[str, Any]:
    """Builds every part of the bundle and runs its network once on zeros; its description if all is well."""
    task = BundleInferTask(bundle)
    network = task.initial_network().eval()
    with torch.no_grad():
        try:
            out = network(torch.zeros((1, task.input_channels, *task.roi_size)))
        except Exception as error:  # noqa: BLE001
            raise BundleError(
                f"the network does not run on a {task.input_channels}-channel {list(task.roi_size)} patch "
                f"(inferer roi_size): {type(error).__name__}: {error}"
            ) from None
    out = out[0] if isinstance(out, (list, tuple)) else out
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        raise BundleError("the network's output is not a (batch, channel, ...) tensor")
    if int(out.shape[1]) != bundle.channels:
        raise BundleError(
            f"network_def gives {int(out.shape[1])} output channels but metadata.json "
            f"network_data_format.outputs.{bundle.pred_key}.channel_def names {bundle.channels}"
        )
    if bundle.trainable:
        bundle_trainer(task).check()
    return {**bundle.describe(), "config": task.config}


def _main(argv: list[str]) -> int:
    import tempfile

    if len(argv) != 2 or argv[0] != "check":
        print("usage: python -m apps.bundle check BUNDLE(.zip|folder)", file=sys.stderr)
        return 2
    source = Path(argv[1])
    with tempfile.TemporaryDirectory(prefix="bundle-check-") as scratch:
        try:
            bundle = load_bundle(open_bundle(source, Path(scratch) / "x"), bundle_name(source))
            description = check_bundle(bundle)
        except BundleError as error:
            print(json.dumps({"error": str(error)}))
            return 1
    print(json.dumps(description))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
