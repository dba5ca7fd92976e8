// Interoperability check, run by the Python test suite:
//   node check.js CASE.json
// CASE holds a target, layers, float32 teacher and student features and the
// numbers the Python client got for them. This calls both loss RPCs from
// Node.js, compares, provokes a TeacherStudentMismatch and reads its rich
// error details; it prints what it saw as JSON and exits 1 on a mismatch.
'use strict';

const fs = require('node:fs');
const { call, connect, float32Tensor, richError } = require('./distill.js');

function loss(spec) {
  switch (spec.kind) {
    case 'mse':
      return { mse: {} };
    case 'cosine':
      return { cosine: {} };
    case 'kl_divergence':
      return { kl_divergence: { temperature: spec.temperature } };
    default:
      return { combined_kl_mse: { kl_weight: spec.kl_weight, mse_weight: spec.mse_weight, temperature: spec.temperature } };
  }
}

function close(a, b) {
  return Math.abs(a - b) <= 1e-12 * Math.max(1, Math.abs(b));
}

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const client = connect(spec.target);
  const layers = spec.layers.map((layer) => ({ weight: layer.weight, loss: loss(layer), name: layer.name }));
  const teachers = spec.teachers.map((t) => float32Tensor(t.values, t.shape));
  const students = spec.students.map((s) => float32Tensor(s.values, s.shape));

  const total = await call(client, 'ComputeTotalLoss', { layers, teachers, students });
  const single = await call(client, 'ComputeLayerLoss', {
    layers, layer_index: 1, teacher: teachers[1], student: students[1],
  });
  let error = null;
  try {
    await call(client, 'ComputeLayerLoss', {
      layers, layer_index: 0, teacher: teachers[0], student: float32Tensor([1, 2, 3]),
    });
  } catch (e) {
    error = richError(e);
  }
  const seen = {
    total_loss: total.total_loss,
    layer_losses: total.layer_losses.map((l) => l.weighted_loss),
    names: total.layer_losses.map((l) => l.name),
    layer_1: single.layer_loss.weighted_loss,
    error,
  };
  console.log(JSON.stringify(seen));
  const ok = close(seen.total_loss, spec.expected_total)
    && close(seen.layer_1, spec.expected_layer_1)
    && error !== null && error.reason === 'TEACHER_STUDENT_MISMATCH';
  client.close();
  process.exit(ok ? 0 : 1);
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
