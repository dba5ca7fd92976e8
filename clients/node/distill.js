// A DistillService client for Node.js: the stub loaded from the package's
// own copy of the .proto, tensors from typed arrays (and back, whatever their
// byte offset), TLS and bearer tokens, streams, and typed rich errors.
'use strict';

const path = require('node:path');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const googleProtos = require('google-proto-files');
const protobuf = require('protobufjs');

// The contract: the copy packed into the package (npm pack copies protos/ in),
// else, run from a checkout of the repository, protos/ itself.
const PACKED = path.join(__dirname, 'proto');
const PROTO_ROOT = fs.existsSync(PACKED) ? PACKED : path.resolve(__dirname, '..', '..', 'protos');
const GOOGLE_ROOT = googleProtos.getProtoPath('..'); // holds google/rpc/*.proto
const LOAD_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
const DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024;
const DEFAULT_TIMEOUT = 300;

const definition = protoLoader.loadSync(
  ['distill/v1/distill.proto', 'google/rpc/status.proto', 'google/rpc/error_details.proto'],
  { ...LOAD_OPTIONS, includeDirs: [PROTO_ROOT, GOOGLE_ROOT] },
);
const loaded = grpc.loadPackageDefinition(definition);

// ------------------------------------------------------------------ errors

const rpcTypes = new protobuf.Root().loadSync(
  ['google/rpc/status.proto', 'google/rpc/error_details.proto'].map((file) => path.join(GOOGLE_ROOT, file)),
  { keepCase: true },
);
const Status = rpcTypes.lookupType('google.rpc.Status');
const ErrorInfo = rpcTypes.lookupType('google.rpc.ErrorInfo');
const BadRequest = rpcTypes.lookupType('google.rpc.BadRequest');

/** A failed call: its status code name, message, ErrorInfo reason and metadata, and field violations. */
class DistillError extends Error {
  constructor({ code, message, reason = null, domain = null, metadata = {}, fieldViolations = [] }) {
    super(message);
    this.name = 'DistillError';
    this.code = code;
    this.reason = reason;
    this.domain = domain;
    this.metadata = metadata;
    this.fieldViolations = fieldViolations;
  }

  toJSON() {
    const { code, message, reason, domain, metadata, fieldViolations } = this;
    return { code, message, reason, domain, metadata, fieldViolations };
  }
}

/** The rich error details of a failed gRPC call (grpc-js ServiceError, or a google.rpc.Status message). */
function richError(error) {
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin')[0];
  const status = raw ? Status.decode(raw) : null;
  return fromStatus(status, grpc.status[error.code], error.details);
}

function fromStatus(status, code, message) {
  const result = { code, message, reason: null, domain: null, metadata: {}, fieldViolations: [] };
  for (const detail of (status && status.details) || []) {
    const typeUrl = detail.type_url;
    if (typeUrl.endsWith('/google.rpc.ErrorInfo')) {
      const info = ErrorInfo.decode(detail.value);
      result.reason = info.reason;
      result.domain = info.domain;
      result.metadata = { ...info.metadata };
    } else if (typeUrl.endsWith('/google.rpc.BadRequest')) {
      result.fieldViolations = BadRequest.decode(detail.value).field_violations.map((v) => ({
        field: v.field,
        description: v.description,
      }));
    }
  }
  return new DistillError(result);
}

// ------------------------------------------------------------------ tensors

const DTYPES = {
  DTYPE_FLOAT32: { bytes: 4, array: Float32Array },
  DTYPE_FLOAT64: { bytes: 8, array: Float64Array },
  DTYPE_FLOAT16: { bytes: 2, array: null },
  DTYPE_BFLOAT16: { bytes: 2, array: null },
};

/** A Tensor message: little-endian bytes in C order. `values`: a Float32Array, a Float64Array or numbers (float32). */
function tensor(values, shape = [values.length]) {
  const array = values instanceof Float64Array ? values : Float32Array.from(values);
  const dtype = array instanceof Float64Array ? 'DTYPE_FLOAT64' : 'DTYPE_FLOAT32';
  const data = Buffer.alloc(array.byteLength);
  const write = array instanceof Float64Array ? 'writeDoubleLE' : 'writeFloatLE';
  array.forEach((value, i) => data[write](value, i * array.BYTES_PER_ELEMENT));
  return { dtype, shape, data };
}

/** Kept for existing callers: a float32 Tensor message. */
function float32Tensor(values, shape = [values.length]) {
  return tensor(Float32Array.from(values), shape);
}

function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/**
 * A Tensor message's values as a typed array: Float32Array (float32, and
 * float16 and bfloat16 widened exactly) or Float64Array, whatever the byte
 * offset of its data in the received buffer.
 */
function decodeTensor(message) {
  const kind = DTYPES[message.dtype];
  if (!kind) throw new TypeError(`unknown dtype ${message.dtype}`);
  const data = message.data;
  const count = data.length / kind.bytes;
  if (kind.array === Float64Array) {
    const out = new Float64Array(count);
    for (let i = 0; i < count; i++) out[i] = data.readDoubleLE(i * 8);
    return out;
  }
  const out = new Float32Array(count);
  if (message.dtype === 'DTYPE_FLOAT32') {
    for (let i = 0; i < count; i++) out[i] = data.readFloatLE(i * 4);
  } else if (message.dtype === 'DTYPE_FLOAT16') {
    for (let i = 0; i < count; i++) out[i] = halfToFloat(data.readUInt16LE(i * 2));
  } else {
    const word = Buffer.alloc(4);
    for (let i = 0; i < count; i++) {
      word.writeUInt16LE(0, 0);
      word.writeUInt16LE(data.readUInt16LE(i * 2), 2);
      out[i] = word.readFloatLE(0);
    }
  }
  return out;
}

// ------------------------------------------------------------------ the client

function layerResults(messages) {
  return messages.map((l) => ({
    index: l.layer_index,
    name: l.name,
    loss: l.loss,
    weightedLoss: l.weighted_loss,
    gradient: l.student_gradient && l.student_gradient.data && l.student_gradient.data.length
      ? decodeTensor(l.student_gradient) : null,
  }));
}

/**
 * A client of distill.v1.DistillService.
 *
 * @param {string} target host:port
 * @param {object} [options]
 * @param {number} [options.maxMessageBytes] send and receive limit (256 MiB)
 * @param {number} [options.timeout] seconds a call may take (300)
 * @param {string} [options.token] bearer token (else $DISTILL_AUTH_TOKEN)
 * @param {boolean|{ca?: string, cert?: string, key?: string}} [options.tls] TLS, with PEM file paths
 */
class DistillClient {
  constructor(target = process.env.DISTILL_TARGET || 'localhost:50051', options = {}) {
    const maxMessageBytes = options.maxMessageBytes || DEFAULT_MAX_MESSAGE_BYTES;
    this.timeout = options.timeout || DEFAULT_TIMEOUT;
    const token = options.token || process.env.DISTILL_AUTH_TOKEN;
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
    let credentials = grpc.credentials.createInsecure();
    if (options.tls) {
      const read = (file) => (file ? fs.readFileSync(file) : null);
      const tls = options.tls === true ? {} : options.tls;
      credentials = grpc.credentials.createSsl(read(tls.ca), read(tls.key), read(tls.cert));
    }
    this.stub = new loaded.distill.v1.DistillService(target, credentials, {
      'grpc.max_send_message_length': maxMessageBytes,
      'grpc.max_receive_message_length': maxMessageBytes,
    });
  }

  _call(method, request, timeout) {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + (timeout || this.timeout) * 1000);
      this.stub[method](request, this.metadata, { deadline }, (error, response) =>
        (error ? reject(richError(error)) : resolve(response)));
    });
  }

  /**
   * The weighted sum of every layer's loss, and each layer's part (with `gradients`, its gradient);
   * `labels`: layer index -> class labels, for layers whose loss is `response`.
   */
  async computeTotalLoss(layers, teachers, students, { gradients = false, timeout, labels } = {}) {
    const response = await this._call('ComputeTotalLoss', {
      layers, teachers, students, return_gradients: gradients, labels: labelsByLayer(labels),
    }, timeout);
    return { total: response.total_loss, layers: layerResults(response.layer_losses) };
  }

  /** Layer `layerIndex`'s loss, weighted by its weight (`labels`: its class labels, for a `response` loss). */
  async computeLayerLoss(layers, layerIndex, teacher, student, { gradients = false, timeout, labels } = {}) {
    const response = await this._call('ComputeLayerLoss', {
      layers, layer_index: layerIndex, teacher, student, return_gradients: gradients,
      labels: labels === undefined ? undefined : { classes: Array.from(labels) },
    }, timeout);
    return layerResults([response.layer_loss])[0];
  }

  /** What the server offers: version, device, dtypes, loss kinds, limits. */
  serverInfo({ timeout } = {}) {
    return this._call('GetServerInfo', {}, timeout);
  }

  /** A StreamLosses stream: layers sent once, then `await session.step(teachers, students)`. */
  stream(layers, { gradients = false, stepTimeout } = {}) {
    return new StreamSession(this.stub.StreamLosses(this.metadata), layers, gradients, stepTimeout || this.timeout);
  }

  close() {
    this.stub.close();
  }
}

/** Class labels by layer index as the requests carry them: `{index: {classes: [...]}}`. */
function labelsByLayer(labels) {
  if (labels === undefined) return {};
  return Object.fromEntries(Object.entries(labels).map(([index, values]) => [index, { classes: Array.from(values) }]));
}

/** One StreamLosses stream; steps answer in order. A bad step rejects with its error and the stream goes on. */
class StreamSession {
  constructor(call, layers, gradients, stepTimeout) {
    this.call = call;
    this.stepTimeout = stepTimeout;
    this.nextId = 0;
    this.closed = false;
    this.waiting = [];
    this.call.on('data', (response) => {
      const next = this.waiting.shift();
      if (next) next.resolve(response);
    });
    this.call.on('error', (error) => this._fail(richError(error)));
    this.call.on('end', () => this._fail(new DistillError({ code: 'UNAVAILABLE', message: 'the server ended the stream' })));
    this.call.write({ config: { layers, return_gradients: gradients } });
  }

  _fail(error) {
    this.closed = true;
    for (const next of this.waiting.splice(0)) next.reject(error);
  }

  /** The losses (and gradients, if configured) of one step (`labels` as in computeTotalLoss). */
  step(teachers, students, stepId = this.nextId, { labels } = {}) {
    if (this.closed) return Promise.reject(new DistillError({ code: 'UNAVAILABLE', message: 'the stream is closed' }));
    this.nextId = stepId + 1;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.close();
        reject(new DistillError({
          code: 'DEADLINE_EXCEEDED',
          message: `step ${stepId} got no answer within ${this.stepTimeout} s; the stream is over`,
        }));
      }, this.stepTimeout * 1000);
      this.waiting.push({
        resolve: (response) => {
          clearTimeout(timer);
          if (response.error) {
            reject(fromStatus(response.error, grpc.status[response.error.code], response.error.message));
          } else {
            resolve({ stepId: response.step_id, total: response.total_loss, layers: layerResults(response.layer_losses) });
          }
        },
        reject: (error) => { clearTimeout(timer); reject(error); },
      });
      this.call.write({ step_id: stepId, teachers, students, labels: labelsByLayer(labels) });
    });
  }

  /** End the stream (idempotent). */
  close() {
    if (!this.closed) {
      this.closed = true;
      this.call.cancel();
    }
  }
}

/** Promise wrapper of a unary call on a raw stub (see `connect`). */
function call(client, method, request, deadlineSeconds = 30) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineSeconds * 1000);
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

/** A raw stub of distill.v1.DistillService at `target`, plaintext. */
function connect(target, maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES) {
  return new loaded.distill.v1.DistillService(target, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.max_receive_message_length': maxMessageBytes,
  });
}

module.exports = {
  DistillClient, DistillError, StreamSession, call, connect, decodeTensor, float32Tensor, richError, tensor,
};
