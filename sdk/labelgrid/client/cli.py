"""The SDK's commands of the `labelgrid` console script (hooked in by gateway/cli.py):

    labelgrid models list
    labelgrid images list | upload FILE [--id ID] | download IMAGE [-o FILE]
    labelgrid labels download IMAGE [--tag final] [-o FILE]
    labelgrid infer MODEL IMAGE [-o FILE] [--save-label TAG] [--file]   (--file: IMAGE is a local file)
    labelgrid next-sample --client-id ID [--strategy random]

Every command takes --target (env LABELGRID_TARGET, default Envoy's 127.0.0.1:8000), --token
(env LABELGRID_TOKEN), --timeout and --json (one JSON object per line instead of text).
Transfers show a progress bar on a terminal. A failure prints one line on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from labelgrid.client._client import DEFAULT_TARGET, Client, Progress, Sample, Transfer
from labelgrid.client._errors import LabelgridError
from labelgrid.inference.v1 import resources_pb2 as inf_resources


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("LABELGRID_TARGET", DEFAULT_TARGET),
        help="HOST:PORT of the gRPC edge (env LABELGRID_TARGET; default %(default)s)",
    )
    group.add_argument(
        "--token", default=os.environ.get("LABELGRID_TOKEN", ""), help="bearer token (env LABELGRID_TOKEN)"
    )
    group.add_argument("--timeout", type=float, default=30.0, help="seconds per call (transfers: 20x)")
    group.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    return common  # fmt: skip


def add_commands(commands: Any) -> None:
    """Adds the SDK's subcommands to the `labelgrid` parser's subparsers."""
    common = _common()

    models = commands.add_parser("models", help="models inference serves")
    models_sub = models.add_subparsers(dest="action", required=True)
    models_sub.add_parser("list", parents=[common], help="list the models").set_defaults(run=_models_list)

    images = commands.add_parser("images", help="images of the datastore")
    images_sub = images.add_subparsers(dest="action", required=True)
    images_sub.add_parser("list", parents=[common], help="list the images").set_defaults(run=_images_list)
    upload = images_sub.add_parser("upload", parents=[common], help="upload a NIfTI / NRRD / zipped DICOM file")
    upload.add_argument("file", type=Path)
    upload.add_argument("--id", default="", help="image id (default: the file name without extension)")
    upload.add_argument("--no-replace", action="store_true", help="fail if the image exists")
    upload.set_defaults(run=_images_upload)
    download = images_sub.add_parser("download", parents=[common], help="download an image")
    download.add_argument("image")
    download.add_argument("-o", "--output", type=Path, help="file to write (default: the image's file name)")
    download.set_defaults(run=_images_download)

    labels = commands.add_parser("labels", help="labels of the datastore")
    labels_sub = labels.add_subparsers(dest="action", required=True)
    label_download = labels_sub.add_parser("download", parents=[common], help="download a label")
    label_download.add_argument("image")
    label_download.add_argument("--tag", default="final")
    label_download.add_argument("-o", "--output", type=Path, help="file to write (default: the label's file name)")
    label_download.set_defaults(run=_labels_download)

    infer = commands.add_parser("infer", parents=[common], help="run a model on an image, download the label")
    infer.add_argument("model")
    infer.add_argument("image", help="datastore image id (or a local file with --file)")
    infer.add_argument("-o", "--output", type=Path, help="label file to write (default: the server's name)")
    infer.add_argument("--file", action="store_true", help="IMAGE is a local file, streamed and not stored")
    infer.add_argument("--save-label", default="", metavar="TAG", help="also store the result as this label tag")
    infer.add_argument("--device", default="", help="cpu, cuda, cuda:N (default: the scheduler picks)")
    infer.add_argument("--params", default="", help="JSON object of the task's params")
    infer.set_defaults(run=_infer)

    sample = commands.add_parser("next-sample", parents=[common], help="the next image to label for a client")
    sample.add_argument("--client-id", required=True)
    sample.add_argument("--strategy", default="random")
    sample.set_defaults(run=_next_sample)


def run(args: argparse.Namespace) -> int:
    """Runs a parsed SDK command; returns the exit status (errors are one line on stderr)."""
    try:
        with Client(args.target, token=args.token or None, timeout=args.timeout,
                    transfer_timeout=args.timeout * 20) as client:  # fmt: skip
            args.run(client, args)
        return 0
    except LabelgridError as err:
        print(f"labelgrid: error: {err}", file=sys.stderr)
    except FileNotFoundError as err:
        print(f"labelgrid: error: no such file: {err.filename}", file=sys.stderr)
    except (OSError, ValueError) as err:
        print(f"labelgrid: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("labelgrid: interrupted", file=sys.stderr)
        return 130
    return 1


def main(argv: list[str] | None = None) -> None:
    """`python -m labelgrid.client.cli ...`: the same commands without the rest of `labelgrid`."""
    parser = argparse.ArgumentParser(prog="labelgrid", description="labelgrid's SDK commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    sys.exit(run(parser.parse_args(argv)))


# -- output ---------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    print(json.dumps(record, sort_keys=True) if args.json else text, flush=True)


@contextmanager
def _bar(args: argparse.Namespace, what: str) -> Iterator[Progress | None]:
    """A tqdm bar on stderr while a transfer runs (off with --no-progress, --json or no tty)."""
    if args.no_progress or args.json or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr) as bar:

        def update(done: int, total: int) -> None:
            if total and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        yield update


def _transfer(record: Transfer) -> dict[str, Any]:
    return {"path": str(record.path), "size_bytes": record.size_bytes, "sha256": record.sha256}


# -- commands -------------------------------------------------------------------------------


def _models_list(client: Client, args: argparse.Namespace) -> None:
    for model in client.list_models():
        kind = inf_resources.InferType.Name(model.type).removeprefix("INFER_TYPE_").lower()
        record = {"model": model.model_id, "name": model.name, "type": kind,
                  "labels": dict(model.labels), "model_version": model.model_version}  # fmt: skip
        _emit(args, record, f"{model.model_id}\t{kind}\t{', '.join(model.labels) or '-'}")


def _images_list(client: Client, args: argparse.Namespace) -> None:
    for image in client.list_images():
        tags = sorted(label.tag for label in image.labels)
        record = {"image": image.image_id, "file_name": image.file_name, "size_bytes": image.size_bytes,
                  "sha256": image.sha256, "labels": tags}  # fmt: skip
        _emit(args, record, f"{image.image_id}\t{image.size_bytes}\t{','.join(tags) or '-'}")


def _images_upload(client: Client, args: argparse.Namespace) -> None:
    with _bar(args, f"upload {args.file.name}") as progress:
        image = client.upload_image(args.file, args.id, replace=not args.no_replace, progress=progress)
    record = {"image": image.image_id, "size_bytes": image.size_bytes, "sha256": image.sha256}
    _emit(
        args,
        record,
        f"uploaded {args.file} as image {image.image_id} ({image.size_bytes} bytes, sha256 {image.sha256})",
    )


def _images_download(client: Client, args: argparse.Namespace) -> None:
    with _bar(args, f"image {args.image}") as progress:
        got = client.download_image(args.image, args.output, progress=progress)
    _emit(
        args,
        {"image": args.image, **_transfer(got)},
        f"wrote {got.path} ({got.size_bytes} bytes, sha256 {got.sha256} verified)",
    )


def _labels_download(client: Client, args: argparse.Namespace) -> None:
    with _bar(args, f"label {args.image}/{args.tag}") as progress:
        got = client.download_label(args.image, args.tag, args.output, progress=progress)
    record = {"image": args.image, "tag": args.tag, **_transfer(got)}
    _emit(args, record, f"wrote {got.path} ({got.size_bytes} bytes, sha256 {got.sha256} verified)")


def _infer(client: Client, args: argparse.Namespace) -> None:
    try:
        params = json.loads(args.params) if args.params else None
    except json.JSONDecodeError as err:
        raise ValueError(f"--params is not JSON: {err}") from None
    if params is not None and not isinstance(params, dict):
        raise ValueError("--params must be a JSON object")
    with _bar(args, f"{args.model} label") as progress:
        if args.file:
            result = client.infer_file(
                args.model, args.image, args.output, params=params, device=args.device, progress=progress
            )
        else:
            result = client.infer(args.model, args.image, args.output, save_label_tag=args.save_label,
                                  params=params, device=args.device, progress=progress)  # fmt: skip
    record: dict[str, Any] = {"model": args.model, "image": str(args.image), "label_names": result.label_names,
                              "saved_label": result.saved_label, "model_version": result.model_version,
                              "device": result.device}  # fmt: skip
    if result.label is None:
        _emit(args, record, f"{args.model} ran on {result.device}; no label file")
        return
    record.update(_transfer(result.label))
    _emit(args, record, f"wrote {result.label.path} ({result.label.size_bytes} bytes, sha256 {result.label.sha256} "
                        f"verified) labels {result.label_names} on {result.device}")  # fmt: skip


def _next_sample(client: Client, args: argparse.Namespace) -> None:
    sample = client.next_sample_result(args.client_id, args.strategy)
    if not isinstance(sample, Sample):
        _emit(
            args,
            {"image": None, "reason": sample.reason},
            f"nothing left to label ({sample.reason or 'no reason given'})",
        )
        return
    record = {"image": sample.image_id, "lease_expire_time": sample.lease_expire_time,
              "strategy_info": sample.strategy_info, "file_name": sample.image.file_name}  # fmt: skip
    _emit(args, record, f"{sample.image_id}\tleased until {sample.lease_expire_time}\t"
                        f"{json_format.MessageToJson(sample.image.info, indent=None)}")  # fmt: skip


if __name__ == "__main__":
    main()
