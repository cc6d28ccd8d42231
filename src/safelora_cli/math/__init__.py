"""Math: pure torch functions (projection, selection, low-rank and certificate, the full-rank
delta). No I/O, no report, no display: tensors and plain values in, tensors and plain values out."""
