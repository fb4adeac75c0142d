#!/usr/bin/env node
// Lists the inference service's models and the datastore's status with the code generated
// from protos/ (gen/, see buf.gen.yaml), over one of two transports:
//
//   grpc-web  @connectrpc/connect-web over fetch(): the exact path a browser takes, through
//             Envoy's grpc_web filter (HTTP/1.1, binary protobuf, trailers in the body).
//   grpc      @connectrpc/connect-node over HTTP/2 (h2c): native gRPC, through Envoy or
//             straight to a service.
//
// Usage:
//   node list_models.mjs --url http://127.0.0.1:8000 --transport grpc-web|grpc
//        [--datastore-url URL] [--timeout-ms 10000] [--origin http://viewer.example]
//
// --url serves both services when it is the Envoy edge (it routes by gRPC path); when
// calling the services directly, --url is the inference service and --datastore-url the
// datastore. Output, one JSON object per line (proto3 JSON field names):
//   {"model": {...}}            one line per model, in the app's order
//   {"datastoreStatus": {...}}  last line
// On an RPC error: a {"error": {...}} line on stderr and exit status 1; bad usage: 2.

import { parseArgs } from "node:util";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { toJson } from "@bufbuild/protobuf";
import { InferenceService } from "./gen/labelgrid/inference/v1/inference_service_pb.js";
import { ModelSchema } from "./gen/labelgrid/inference/v1/resources_pb.js";
import {
  DatastoreService,
  GetStatusResponseSchema,
} from "./gen/labelgrid/datastore/v1/datastore_service_pb.js";

const USAGE =
  "usage: node list_models.mjs --url URL --transport grpc-web|grpc " +
  "[--datastore-url URL] [--timeout-ms N] [--origin ORIGIN]";

function usage(message) {
  process.stderr.write(`${message}\n${USAGE}\n`);
  process.exit(2);
}

function options() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        url: { type: "string" },
        transport: { type: "string", default: "grpc-web" },
        "datastore-url": { type: "string" },
        "timeout-ms": { type: "string", default: "10000" },
        origin: { type: "string" },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
    }).values;
  } catch (err) {
    usage(err.message);
  }
  if (parsed.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  if (!parsed.url) usage("--url is required");
  if (!["grpc-web", "grpc"].includes(parsed.transport)) usage(`unknown --transport ${parsed.transport}`);
  const timeoutMs = Number(parsed["timeout-ms"]);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) usage("--timeout-ms must be a positive integer");
  return { ...parsed, timeoutMs, datastoreUrl: parsed["datastore-url"] ?? parsed.url };
}

function transport(kind, baseUrl, origin) {
  // A browser sends Origin on a cross-origin call; --origin lets a test do the same.
  const interceptors = origin
    ? [(next) => async (req) => { req.header.set("origin", origin); return next(req); }]
    : [];
  if (kind === "grpc-web") {
    // Binary protobuf: what Envoy's grpc_web filter translates (it does not do +json).
    return createGrpcWebTransport({ baseUrl, useBinaryFormat: true, interceptors });
  }
  return createGrpcTransport({ baseUrl, interceptors });
}

function line(object) {
  process.stdout.write(`${JSON.stringify(object)}\n`);
}

async function main() {
  const opts = options();
  const inference = createClient(InferenceService, transport(opts.transport, opts.url, opts.origin));
  const datastore = createClient(
    DatastoreService,
    transport(opts.transport, opts.datastoreUrl, opts.origin),
  );
  const callOptions = { timeoutMs: opts.timeoutMs };
  const { models } = await inference.listModels({}, callOptions);
  for (const model of models) {
    line({ model: toJson(ModelSchema, model) });
  }
  const status = await datastore.getStatus({}, callOptions);
  line({ datastoreStatus: toJson(GetStatusResponseSchema, status, { alwaysEmitImplicit: true }) });
}

main().catch((err) => {
  const error = ConnectError.from(err);
  process.stderr.write(
    `${JSON.stringify({ error: { code: error.code, codeName: Code[error.code], message: error.rawMessage } })}\n`,
  );
  process.exit(1);
});
