"""The DistillService protocol as both sides speak it: the error tree and its
wire form, loss configurations, the tensor codec, zero-copy request framing
and the table of RPCs.

Imported by ``distill_client`` (which re-exports what users need) and by
``distill_server``; it depends only on the generated ``distill.v1`` code,
gRPC's status helpers and NumPy.
"""

__all__: list[str] = []
