#!/usr/bin/env node
// labelgrid's gRPC services from Node with the code protoc-gen-es generates from protos/ (gen/,
// see buf.gen.yaml), over native gRPC (@connectrpc/connect-node, HTTP/2) or gRPC-web through
// Envoy (@connectrpc/connect-web over fetch: the path a browser takes).
//
//   node labelgrid_client.mjs [--url http://127.0.0.1:8000] [--transport grpc|grpc-web]
//        [--token T] [--timeout-ms N] COMMAND [flags]
//
//   models                                              list the models inference serves
//   upload --file F [--image-id ID]                     upload a NIfTI file with its sha256
//   infer --model M --image ID --out F [--save-tag T]   run a model, stream the label to F, verify its sha256
//   download-label --image ID [--tag final] --out F     download a stored label to F, verify its sha256
//   next-sample --client-id C [--strategy random]       the next image active learning hands C
//
// upload over native gRPC is a client stream (header, 1 MiB chunks, sha256). Browsers cannot
// stream a request body, so gRPC-web has no client streams: with --transport grpc-web, upload
// takes the browser's path instead, MONAI Label's REST upload (PUT /datastore/image) on the same
// Envoy port, and then checks over gRPC-web that the stored image has the file's sha256.
//
// Each result is one JSON object per line on stdout. An RPC error prints
// {"error": {"code": ..., "codeName": ..., "message": ...}} on stderr and exits 1; bad usage 2.

import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdtemp, open, readFile, rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { parseArgs } from "node:util";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ActiveLearningService } from "./gen/labelgrid/activelearning/v1/activelearning_service_pb.js";
import { DatastoreService } from "./gen/labelgrid/datastore/v1/datastore_service_pb.js";
import { InferenceService } from "./gen/labelgrid/inference/v1/inference_service_pb.js";
import { NoSampleReason } from "./gen/labelgrid/activelearning/v1/activelearning_service_pb.js";

const CHUNK_BYTES = 1 << 20; // the contracts' largest chunk
const USAGE =
  "usage: node labelgrid_client.mjs [--url URL] [--transport grpc|grpc-web] [--token T] [--timeout-ms N]\n" +
  "       models | upload --file F [--image-id ID] | infer --model M --image ID --out F [--save-tag T]\n" +
  "       | download-label --image ID [--tag final] --out F | next-sample --client-id C [--strategy random]";

class UsageError extends Error {}

function options(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        url: { type: "string", default: "http://127.0.0.1:8000" },
        transport: { type: "string", default: "grpc" },
        token: { type: "string", default: process.env.LABELGRID_TOKEN ?? "" },
        "timeout-ms": { type: "string", default: "120000" },
        file: { type: "string" },
        "image-id": { type: "string", default: "" },
        image: { type: "string" },
        model: { type: "string" },
        out: { type: "string" },
        "save-tag": { type: "string", default: "" },
        tag: { type: "string", default: "final" },
        "client-id": { type: "string" },
        strategy: { type: "string", default: "random" },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (err) {
    throw new UsageError(err.message);
  }
  const opts = parsed.values;
  if (opts.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  if (parsed.positionals.length !== 1) throw new UsageError("exactly one command is required");
  if (!["grpc", "grpc-web"].includes(opts.transport)) throw new UsageError(`unknown --transport ${opts.transport}`);
  const timeoutMs = Number(opts["timeout-ms"]);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) throw new UsageError("--timeout-ms must be a positive integer");
  return { ...opts, command: parsed.positionals[0], timeoutMs };
}

function need(opts, name) {
  if (!opts[name]) throw new UsageError(`${opts.command} needs --${name}`);
  return opts[name];
}

function emit(record) {
  process.stdout.write(`${JSON.stringify(record)}\n`);
}

function transport(opts) {
  const interceptors = opts.token
    ? [(next) => async (req) => { req.header.set("authorization", `Bearer ${opts.token}`); return next(req); }]
    : [];
  if (opts.transport === "grpc-web") {
    // Binary protobuf: what Envoy's grpc_web filter translates (it does not do +json).
    return createGrpcWebTransport({ baseUrl: opts.url, useBinaryFormat: true, interceptors });
  }
  return createGrpcTransport({ baseUrl: opts.url, interceptors });
}

/** Writes the chunks to a temp file beside `path`, checks size and sha256, renames it into place. */
async function receive(path, blob, chunks) {
  const dir = await mkdtemp(join(dirname(path), `.${basename(path)}.`));
  const tmp = join(dir, "part");
  try {
    const file = await open(tmp, "w");
    const digest = createHash("sha256");
    let size = 0;
    try {
      for await (const chunk of chunks) {
        digest.update(chunk);
        await file.write(chunk);
        size += chunk.length;
      }
    } finally {
      await file.close();
    }
    const got = digest.digest("hex");
    if (BigInt(size) !== BigInt(blob.sizeBytes) || got !== blob.sha256.toLowerCase()) {
      throw new Error(`checksum mismatch: got ${size} bytes sha256 ${got}, server announced ${blob.sizeBytes} bytes sha256 ${blob.sha256}`);
    }
    await rename(tmp, path);
    return { path, size_bytes: size, sha256: got };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function* rest(first, stream) {
  // The chunks after the first message of a server stream.
  void first;
  for await (const message of stream) {
    if (message.payload.case !== "chunk") throw new Error(`unexpected ${message.payload.case} in a stream`);
    yield message.payload.value;
  }
}

async function firstOf(stream) {
  const iterator = stream[Symbol.asyncIterator]();
  const first = await iterator.next();
  return [first.done ? undefined : first.value, { [Symbol.asyncIterator]: () => iterator }];
}

async function models(opts, call) {
  const inference = createClient(InferenceService, transport(opts));
  for (const model of (await inference.listModels({}, call)).models) {
    emit({ model: model.modelId, name: model.name, labels: model.labels });
  }
}

async function upload(opts, call) {
  const file = need(opts, "file");
  const { size } = await stat(file);
  const datastore = createClient(DatastoreService, transport(opts));
  if (opts.transport === "grpc-web") {
    // The browser's upload: REST on the same edge, then the stored sha256 checked over gRPC-web.
    const bytes = await readFile(file);
    const sha256 = createHash("sha256").update(bytes).digest("hex");
    const form = new FormData();
    form.append("file", new Blob([bytes]), basename(file));
    const query = opts["image-id"] ? `?image=${encodeURIComponent(opts["image-id"])}` : "";
    const headers = opts.token ? { authorization: `Bearer ${opts.token}` } : {};
    const answer = await fetch(`${opts.url}/datastore/image${query}`, {
      method: "PUT", body: form, headers, signal: AbortSignal.timeout(opts.timeoutMs),
    });
    if (!answer.ok) throw new ConnectError(`REST upload: HTTP ${answer.status} ${await answer.text()}`, Code.Unknown);
    const { image: imageId } = await answer.json();
    const { image } = await datastore.getImage({ name: `images/${imageId}` }, call);
    if (image.sha256 !== sha256) throw new Error(`stored sha256 ${image.sha256} is not the file's ${sha256}`);
    emit({ image: image.imageId, size_bytes: Number(image.sizeBytes), sha256: image.sha256 });
    return;
  }
  async function* messages() {
    yield { payload: { case: "header", value: { imageId: opts["image-id"], fileName: basename(file), sizeBytes: BigInt(size) } } };
    const digest = createHash("sha256");
    for await (const chunk of createReadStream(file, { highWaterMark: CHUNK_BYTES })) {
      digest.update(chunk);
      yield { payload: { case: "chunk", value: new Uint8Array(chunk) } };
    }
    yield { payload: { case: "finish", value: { sha256: digest.digest("hex") } } };
  }
  const { image } = await datastore.uploadImage(messages(), call);
  emit({ image: image.imageId, size_bytes: Number(image.sizeBytes), sha256: image.sha256 });
}

async function infer(opts, call) {
  const [model, image, out] = [need(opts, "model"), need(opts, "image"), need(opts, "out")];
  const inference = createClient(InferenceService, transport(opts));
  const saveTag = opts["save-tag"];
  const stream = inference.infer(
    {
      model: `models/${model}`,
      image: `images/${image}`,
      params: { result: { saveLabel: saveTag !== "", labelTag: saveTag } },
    },
    call,
  );
  const [first, others] = await firstOf(stream);
  if (first?.payload.case !== "header" || !first.payload.value.label) throw new Error("the inference answer carries no label");
  const header = first.payload.value;
  const record = await receive(out, header.label, rest(first, others));
  emit({ ...record, model, image, label_names: header.labelNames, saved_label: header.savedLabel, device: header.device });
}

async function downloadLabel(opts, call) {
  const [image, out] = [need(opts, "image"), need(opts, "out")];
  const datastore = createClient(DatastoreService, transport(opts));
  const stream = datastore.downloadLabel({ name: `images/${image}/labels/${opts.tag}` }, call);
  const [first, others] = await firstOf(stream);
  if (first?.payload.case !== "info") throw new Error("the download did not start with the label's info");
  const record = await receive(out, first.payload.value, rest(first, others));
  emit({ ...record, image, tag: opts.tag });
}

async function nextSample(opts, call) {
  const clientId = need(opts, "client-id");
  const activelearning = createClient(ActiveLearningService, transport(opts));
  const answer = await activelearning.nextSample({ strategy: `strategies/${opts.strategy}`, clientId }, call);
  if (!answer.image) {
    emit({ image: null, reason: `NO_SAMPLE_REASON_${NoSampleReason[answer.noSampleReason]}` });
    return;
  }
  const expire = answer.lease?.expireTime;
  const expireTime = expire ? new Date(Number(expire.seconds) * 1000 + Math.floor(expire.nanos / 1e6)).toISOString() : "";
  emit({ image: answer.image.imageId, lease_expire_time: expireTime });
}

const COMMANDS = { models, upload, infer, "download-label": downloadLabel, "next-sample": nextSample };

async function main() {
  let opts;
  try {
    opts = options(process.argv.slice(2));
    if (!(opts.command in COMMANDS)) throw new UsageError(`unknown command ${opts.command}`);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`labelgrid-client: ${err.message}\n${USAGE}\n`);
    process.exit(2);
  }
  await COMMANDS[opts.command](opts, { timeoutMs: opts.timeoutMs });
}

main().catch((err) => {
  let error;
  if (err instanceof ConnectError) {
    error = { code: err.code, codeName: Code[err.code], message: err.rawMessage };
  } else {
    error = { code: null, codeName: "LOCAL", message: err?.message ?? String(err) };
  }
  process.stderr.write(`${JSON.stringify({ error })}\n`);
  process.exit(1);
});
