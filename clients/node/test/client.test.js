// npm test: the client against a live server at $DISTILL_TARGET (the Python
// test suite starts one and runs this).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { DistillClient, DistillError, decodeTensor, tensor } = require('../distill.js');

const target = process.env.DISTILL_TARGET;
const mse = { weight: 1, loss: { mse: {} }, name: 'mse' };

test('a known loss and its gradient', async () => {
  const client = new DistillClient(target, { timeout: 30 });
  try {
    const result = await client.computeTotalLoss([mse], [tensor([1, 2, 3, 4])], [tensor([1, 2, 3, 6])], { gradients: true });
    assert.equal(result.total, 1); // (6 - 4)^2 / 4
    assert.equal(result.layers[0].name, 'mse');
    assert.deepEqual(Array.from(result.layers[0].gradient), [0, 0, 0, 1]); // 2 (s - t) / n
    const single = await client.computeLayerLoss([mse], 0, tensor(new Float64Array([0, 0])), tensor(new Float64Array([3, 4])));
    assert.equal(single.weightedLoss, 12.5);
    const info = await client.serverInfo();
    assert.equal(info.device, 'cpu');
  } finally {
    client.close();
  }
});

test('errors are typed, with the reason and the field', async () => {
  const client = new DistillClient(target, { timeout: 30 });
  try {
    await assert.rejects(client.computeTotalLoss([mse], [tensor([1, 2, 3])], [tensor([1, 2])]), (error) => {
      assert.ok(error instanceof DistillError);
      assert.equal(error.code, 'INVALID_ARGUMENT');
      assert.equal(error.reason, 'TEACHER_STUDENT_MISMATCH');
      assert.deepEqual(error.fieldViolations.map((v) => v.field), ['students[0]']);
      return true;
    });
  } finally {
    client.close();
  }
});

test('a stream goes on after a bad step', async () => {
  const client = new DistillClient(target, { timeout: 30 });
  const session = client.stream([mse], { gradients: true });
  try {
    const first = await session.step([tensor([0, 0])], [tensor([1, 1])]);
    assert.equal(first.stepId, 0);
    assert.equal(first.total, 1);
    await assert.rejects(session.step([tensor([0])], [tensor([1, 1])]), (error) => error.reason === 'TEACHER_STUDENT_MISMATCH');
    const third = await session.step([tensor([0, 0])], [tensor([2, 2])]);
    assert.equal(third.stepId, 2);
    assert.equal(third.total, 4);
    assert.deepEqual(Array.from(third.layers[0].gradient), [2, 2]);
  } finally {
    session.close();
    client.close();
  }
});

test('a response loss takes its labels, and a batch loss any widths', async () => {
  const client = new DistillClient(target, { timeout: 30 });
  try {
    const response = {
      weight: 1,
      loss: { response: { hard_label_weight: 1, soft_label_weight: 0, soft_loss: { mse: {} } } },
    };
    const logits = { dtype: 'DTYPE_FLOAT64', shape: [2, 2], data: Buffer.from(new Float64Array([0, 0, 0, 0]).buffer) };
    const result = await client.computeTotalLoss([response], [logits], [logits], { labels: { 0: [1, 0] } });
    assert.ok(Math.abs(result.total - Math.log(2)) < 1e-15); // CE of equal logits: ln 2
    const single = await client.computeLayerLoss([response], 0, logits, logits, { labels: [0, 1] });
    assert.ok(Math.abs(single.loss - Math.log(2)) < 1e-15);
    await assert.rejects(client.computeTotalLoss([response], [logits], [logits]), (error) => {
      assert.equal(error.code, 'INVALID_ARGUMENT');
      assert.deepEqual(error.fieldViolations.map((v) => v.field), ['labels[0]']);
      return true;
    });
    const wide = { dtype: 'DTYPE_FLOAT64', shape: [3, 4], data: Buffer.from(new Float64Array(12).fill(1).buffer) };
    const narrow = { dtype: 'DTYPE_FLOAT64', shape: [3, 2], data: Buffer.from(new Float64Array([1, 0, 0, 1, 1, 1]).buffer) };
    const sp = await client.computeTotalLoss([{ weight: 1, loss: { similarity_preserving: {} } }], [wide], [narrow]);
    assert.ok(sp.total > 0); // the teacher's samples are alike, the student's are not
  } finally {
    client.close();
  }
});

test('tensors decode at any byte offset, in every dtype', () => {
  const backing = Buffer.alloc(1 + 8);
  backing.writeFloatLE(1.5, 1);
  backing.writeFloatLE(-2.25, 5);
  const unaligned = backing.subarray(1); // offset 1: new Float32Array(buffer, 1, 2) would throw
  assert.deepEqual(Array.from(decodeTensor({ dtype: 'DTYPE_FLOAT32', data: unaligned })), [1.5, -2.25]);
  const half = Buffer.from([0x00, 0x3c, 0x01, 0x00, 0x00, 0xfc]); // 1, the smallest subnormal, -inf
  assert.deepEqual(Array.from(decodeTensor({ dtype: 'DTYPE_FLOAT16', data: half })), [1, 2 ** -24, -Infinity]);
  const bfloat = Buffer.from([0xc0, 0x3f, 0x10, 0xc0]); // 1.5, -2.25
  assert.deepEqual(Array.from(decodeTensor({ dtype: 'DTYPE_BFLOAT16', data: bfloat })), [1.5, -2.25]);
  const doubles = tensor(new Float64Array([0.1, 1e300]));
  assert.equal(doubles.dtype, 'DTYPE_FLOAT64');
  assert.deepEqual(Array.from(decodeTensor(doubles)), [0.1, 1e300]);
});
