// A DistillService client for Node.js: the generated stub loaded from the
// .proto at run time, tensors from Float32Arrays, and rich errors decoded.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const googleProtos = require('google-proto-files');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const GOOGLE_ROOT = googleProtos.getProtoPath('..'); // holds google/rpc/*.proto
const LOAD_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };

const definition = protoLoader.loadSync(
  ['distill/v1/distill.proto', 'google/rpc/status.proto', 'google/rpc/error_details.proto'],
  { ...LOAD_OPTIONS, includeDirs: [PROTO_ROOT, GOOGLE_ROOT] },
);
const loaded = grpc.loadPackageDefinition(definition);

/** A client of distill.v1.DistillService at `target` (host:port), plaintext. */
function connect(target, maxMessageBytes = 256 * 1024 * 1024) {
  return new loaded.distill.v1.DistillService(target, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.max_receive_message_length': maxMessageBytes,
  });
}

/** A Tensor message of float32 values: little-endian bytes, C order. */
function float32Tensor(values, shape = [values.length]) {
  const array = Float32Array.from(values);
  const data = Buffer.alloc(array.length * 4);
  array.forEach((value, i) => data.writeFloatLE(value, i * 4));
  return { dtype: 'DTYPE_FLOAT32', shape, data };
}

/** Promise wrapper of a unary call. */
function call(client, method, request, deadlineSeconds = 30) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineSeconds * 1000);
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// google.rpc.Status and its details, for reading rich errors.
const rpcTypes = new protobuf.Root().loadSync(
  ['google/rpc/status.proto', 'google/rpc/error_details.proto'].map((file) => path.join(GOOGLE_ROOT, file)),
  { keepCase: true },
);
const Status = rpcTypes.lookupType('google.rpc.Status');
const ErrorInfo = rpcTypes.lookupType('google.rpc.ErrorInfo');
const BadRequest = rpcTypes.lookupType('google.rpc.BadRequest');

/**
 * The standard rich error details of a failed call: status code and message,
 * the ErrorInfo (reason, domain, metadata) and BadRequest field violations.
 */
function richError(error) {
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin')[0];
  const result = { code: grpc.status[error.code], message: error.details, reason: null, metadata: {}, fieldViolations: [] };
  if (!raw) return result;
  const status = Status.decode(raw);
  for (const detail of status.details) {
    if (detail.type_url.endsWith('/google.rpc.ErrorInfo')) {
      const info = ErrorInfo.decode(detail.value);
      result.reason = info.reason;
      result.domain = info.domain;
      result.metadata = { ...info.metadata };
    } else if (detail.type_url.endsWith('/google.rpc.BadRequest')) {
      result.fieldViolations = BadRequest.decode(detail.value).field_violations.map((v) => ({
        field: v.field,
        description: v.description,
      }));
    }
  }
  return result;
}

module.exports = { call, connect, float32Tensor, richError };
