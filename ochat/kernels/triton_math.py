"""Math the Triton kernels share that `triton.language` lacks in a form TRITON_INTERPRET=1 also runs.

`tanh` (GeGLU's tanh-approximated GELU, Gemma's final-logit soft-capping): Triton's libdevice tanh does not
run under the interpreter, so the CPU tests could not check the kernels that use it.
"""
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def tanh(x):
        """float32 tanh: an odd series below |x| = 0.1 (where 1 - exp(-2|x|) would cancel), the exp form above.

        Error: series below 2e-10 relative; exp form about 1e-7 absolute.
        """
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        far = (1.0 - e) / (1.0 + e)
        a2 = a * a
        near = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
        r = tl.where(a < 0.1, near, far)
        return tl.where(x < 0, -r, r)
