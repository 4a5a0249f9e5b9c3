"""Triton kernels of the ops (the GPU's fused path; on a CPU only under
TRITON_INTERPRET=1).

What both modules share:

- Only core ``tl`` math is used (``tl.sigmoid``, ``tl.sqrt``; no libdevice),
  and every load is converted to the accumulation dtype before any math:
  the Triton CPU interpreter needs both.
- In float32 on a GPU, ``tl.sqrt`` and the sigmoid's exp and division compile
  to the hardware's approximate instructions (sm_90 PTX: ``sqrt.approx``,
  ``ex2.approx``, ``div.full``, within about 2 ulps), where the interpreter
  rounds each step exactly: GPU results may differ from the interpreter's by
  a few ulps.
- eps reaches a kernel as three float32 numbers whose float64 sum is exactly
  eps (``iwn.float32_parts``): Triton passes a Python float as float32
  whatever the parameter's annotation says, and float64 data must see eps
  unrounded.
"""
