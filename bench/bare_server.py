"""The baseline: a bare grpcio server for the same RPC, with no validation or engine.

It parses the same requests and answers the MSE of the first pair with one
NumPy ``dot`` (and, for ComputeLayerLoss, its gradient), so
``bench_loopback.py`` can compare DistillService against the cheapest call
that carries the same bytes.
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc
import numpy as np

from distill.v1 import distill_pb2 as pb
from distill.v1 import distill_pb2_grpc as pb_grpc

LIMIT = 512 * 1024 * 1024


class Bare(pb_grpc.DistillServiceServicer):
    def ComputeLayerLoss(
        self, request: pb.ComputeLayerLossRequest, context: grpc.ServicerContext
    ) -> pb.ComputeLayerLossResponse:
        """The MSE and its gradient ``2 (s - t) / n``, sent back the protobuf way."""
        t = np.frombuffer(request.teacher.data, dtype=np.float32)
        s = np.frombuffer(request.student.data, dtype=np.float32)
        d = s - t
        gradient = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[t.size], data=(d * (2 / t.size)).tobytes())
        loss = float(np.dot(d, d)) / t.size
        return pb.ComputeLayerLossResponse(
            layer_loss=pb.LayerLoss(loss=loss, weighted_loss=loss, student_gradient=gradient)
        )

    def ComputeTotalLoss(
        self, request: pb.ComputeTotalLossRequest, context: grpc.ServicerContext
    ) -> pb.ComputeTotalLossResponse:
        t = np.frombuffer(request.teachers[0].data, dtype=np.float32)
        s = np.frombuffer(request.students[0].data, dtype=np.float32)
        d = t - s
        return pb.ComputeTotalLossResponse(total_loss=float(np.dot(d, d)) / t.size)


def main() -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        options=[
            ("grpc.max_send_message_length", LIMIT),
            ("grpc.max_receive_message_length", LIMIT),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_DistillServiceServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    server.stop(None)


if __name__ == "__main__":
    main()
