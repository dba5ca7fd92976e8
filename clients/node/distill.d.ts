// Types of distill-service-client (distill.js).

/** A Tensor message: raw little-endian bytes in C order beside a dtype and a shape. */
export interface Tensor {
  dtype: 'DTYPE_FLOAT32' | 'DTYPE_FLOAT16' | 'DTYPE_BFLOAT16' | 'DTYPE_FLOAT64';
  shape: number[];
  data: Buffer;
}

/** Which formula a batch loss follows where the reference code departs from the paper. */
export type Formulation = 'FORMULATION_PAPER' | 'FORMULATION_CODE';

/** One of the loss kinds (the proto's `Loss`); unset options take their defaults. */
export type Loss =
  | { mse: Record<string, never> }
  | { cosine: Record<string, never> }
  | { kl_divergence: { temperature: number } }
  | { combined_kl_mse: { kl_weight: number; mse_weight: number; temperature: number } }
  | { similarity_preserving: { normalization?: 'GRAM_NORMALIZATION_L2' | 'GRAM_NORMALIZATION_L1' } }
  | { linear_cka: Record<string, never> }
  | { pkt: { eps?: number; mode?: Formulation } }
  | { attention_transfer: { p?: number; mode?: Formulation } }
  | { correlation_congruence: {
      kernel?: 'CORRELATION_KERNEL_GAUSSIAN' | 'CORRELATION_KERNEL_BILINEAR';
      gamma?: number; max_p?: number; mode?: Formulation;
    } }
  | { nst: { degree?: number; c?: number } }
  | { rkd: { distance_weight?: number; angle_weight?: number } }
  | { kd: { temperature?: number } }
  | { dist: { beta?: number; gamma?: number; temperature?: number } }
  | { logit_standardized_kd: { temperature?: number } }
  | { response: { hard_label_weight: number; soft_label_weight: number; soft_loss: Loss } };

/** A layer: `weight * loss(teacher, student)`; `loss` holds one of the loss kinds. */
export interface Layer {
  weight: number;
  loss: Loss;
  name?: string;
}

export interface LayerResult {
  index: number;
  name: string;
  loss: number;
  weightedLoss: number;
  /** `weight * d loss / d student`, when gradients were asked for. */
  gradient: Float32Array | Float64Array | null;
}

export interface TotalLoss {
  total: number;
  layers: LayerResult[];
}

export interface StepResult extends TotalLoss {
  stepId: number;
}

export interface ClientOptions {
  /** Send and receive limit in bytes (256 MiB). */
  maxMessageBytes?: number;
  /** Seconds a call (or a stream step) may take (300). */
  timeout?: number;
  /** Bearer token (else $DISTILL_AUTH_TOKEN). */
  token?: string;
  /** TLS: true for the system's roots, or PEM file paths. */
  tls?: boolean | { ca?: string; cert?: string; key?: string };
}

export interface CallOptions {
  gradients?: boolean;
  timeout?: number;
  /** Layer index -> class labels (one per sample), for layers whose loss is `response`. */
  labels?: Record<number, ArrayLike<number>>;
}

/** A failed call: its status code name, message, ErrorInfo reason and metadata, and field violations. */
export class DistillError extends Error {
  code: string;
  reason: string | null;
  domain: string | null;
  metadata: Record<string, string>;
  fieldViolations: { field: string; description: string }[];
}

export class StreamSession {
  readonly closed: boolean;
  step(
    teachers: Tensor[], students: Tensor[], stepId?: number, options?: { labels?: Record<number, ArrayLike<number>> },
  ): Promise<StepResult>;
  close(): void;
}

export class DistillClient {
  constructor(target?: string, options?: ClientOptions);
  computeTotalLoss(layers: Layer[], teachers: Tensor[], students: Tensor[], options?: CallOptions): Promise<TotalLoss>;
  computeLayerLoss(
    layers: Layer[], layerIndex: number, teacher: Tensor, student: Tensor,
    options?: { gradients?: boolean; timeout?: number; labels?: ArrayLike<number> },
  ): Promise<LayerResult>;
  serverInfo(options?: { timeout?: number }): Promise<Record<string, unknown>>;
  stream(layers: Layer[], options?: { gradients?: boolean; stepTimeout?: number }): StreamSession;
  close(): void;
}

/** A Tensor of `values` (float64 for a Float64Array, else float32). */
export function tensor(values: Float32Array | Float64Array | number[], shape?: number[]): Tensor;
export function float32Tensor(values: ArrayLike<number>, shape?: number[]): Tensor;
/** A Tensor's values, whatever the byte offset of its data; float16 and bfloat16 widened to float32. */
export function decodeTensor(message: Tensor): Float32Array | Float64Array;
/** The rich error details of a failed grpc-js call. */
export function richError(error: unknown): DistillError;
